"""Per-stage throughput at paper resolution on toy-city data, printed as one table.

    python bench.py                 # every stage, CPU, the threads torch picks (set --threads)
    python bench.py --stages group copypaste --threads 1

Each stage's function returns rows (stage, what, value, unit). Numbers go into the README's bench table.
Not a test: timings are measured here, never asserted.
"""
import argparse
import os
import platform
import time

import torch


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn, repeat=3, warmup=1):
    """Median wall seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ----- stage benches (each: def bench_<stage>(args) -> list of (stage, what, value, unit)) -----------------

# ===== depth =====

# ===== group =====

# ===== copypaste =====

# ===== swav_dense =====

# ===== cluster =====

# ===== finetune =====

STAGES = ["depth", "group", "copypaste", "swav_dense", "cluster", "finetune"]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU rows)")
    p.add_argument("--data", default="runs/bench/toycity", help="toy city rendered at paper size if absent")
    return p


def main():
    args = get_args_parser().parse_args()
    torch.set_num_threads(args.threads)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} torch threads"
    if args.device.startswith("cuda"):
        machine += f", GPU {torch.cuda.get_device_name()}"
    rows = []
    for stage in args.stages:
        fn = globals().get(f"bench_{stage}")
        if fn is None:
            print(f"[bench] {stage}: no bench yet")
            continue
        rows += fn(args)
    print(f"\nmachine: {machine}")
    print(f"| stage | what | value | unit |\n|---|---|---|---|")
    for stage, what, value, unit in rows:
        print(f"| {stage} | {what} | {value:.3g} | {unit} |")


if __name__ == "__main__":
    main()
