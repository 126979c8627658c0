"""The test suite: `python -m pytest test_all.py` (a few minutes on 2 CPU cores).

Sections follow the pipeline: toy city and readers, depth, group, copypaste, swav_dense, cluster, finetune,
hygiene. Stage tests run the real command lines on a tiny toy city rendered once per session.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(size=(64, 128), train_sequences=2, val_sequences=2, frames=4, seed=0)


def run_cli(*args, timeout=600):
    """Run `python <args>` in the repository root; fail the test with its output on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory):
    """A toy city of 2 + 2 sequences of 4 frames at 64 x 128, rendered once (a few seconds)."""
    import toycity
    root = tmp_path_factory.mktemp("toycity")
    toycity.render_dataset(str(root), **TINY)
    return str(root)


# ==========================================================================================================
# toycity.py and the readers
# ==========================================================================================================

# ==========================================================================================================
# depth.py
# ==========================================================================================================

# ==========================================================================================================
# group.py
# ==========================================================================================================

# ==========================================================================================================
# copypaste.py
# ==========================================================================================================

# ==========================================================================================================
# swav_dense.py
# ==========================================================================================================

# ==========================================================================================================
# cluster.py
# ==========================================================================================================

# ==========================================================================================================
# finetune.py
# ==========================================================================================================

# ==========================================================================================================
# hygiene
# ==========================================================================================================
