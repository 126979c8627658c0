"""Summaries of the toy presets with the power to tell: every seed, the mean and standard deviation of each
variant, and the 95 % confidence interval of its difference to a reference variant, paired by seed (the same
seed draws the same labelled subset and initialization in every variant, so differences pair).

    python report.py toy WORK          # `bash pipeline.sh toy`'s table
    python report.py instance WORK     # `bash pipeline.sh toy-instance`'s table
    python report.py ablations ABL     # `bash pipeline.sh toy-ablations`'s tables, claims and docs/ablations.png

Not a stage: it reads the stages' eval.json / metrics.json and writes only the plot. A claim of the paper is
"supported" when the interval of the difference lies above 0, "contradicted" when below, and otherwise "not
distinguishable at this scale".
"""
import argparse
import glob
import json
import os
import re

import numpy as np
import scipy.stats
from PIL import Image, ImageDraw, ImageFont

# (variant folder name, label): the toy-ablations variants, the reference (the method) first
VARIANTS = [("depth", "ours: depth proposals, copy-paste, lambda 0.5"), ("no-copy-paste", "no copy-paste (M 0)"),
            ("felzenszwalb", "felzenszwalb proposals (color only)"), ("gt", "ground-truth proposals"),
            ("lam1", "lambda 1 (pixel positives only)"), ("released-infomap", "InfoMap --preferred-modules 10"),
            ("random-init", "random initialization (no pre-training)")]
METRICS = [("cluster", "miou", "clustering mIoU"), ("cluster", "pixel_accuracy", "clustering accuracy"),
           ("finetune", "miou", "fine-tuned mIoU")]
# (the paper's claim as issue #17 lists them, variant that should be higher, lower, metric index): a README line each
CLAIMS = [("Table 1: pre-training (ours) beats random initialization, clustering mIoU", "depth", "random-init", 0),
          ("Table 1: pre-training (ours) beats random initialization, clustering accuracy", "depth", "random-init", 1),
          ("Table 2: pre-training (ours) beats training from scratch, fine-tuned mIoU", "depth", "random-init", 2),
          ("Table 3: depth proposals beat color-only proposals, clustering mIoU", "depth", "felzenszwalb", 0),
          ("Table 3: depth proposals beat color-only proposals, fine-tuned mIoU", "depth", "felzenszwalb", 2),
          ("Table 4: ground-truth proposals beat depth proposals, clustering mIoU", "gt", "depth", 0),
          ("Table 4: ground-truth proposals beat depth proposals, fine-tuned mIoU", "gt", "depth", 2),
          ("Table 4: copy-paste beats none (M 0), clustering mIoU", "depth", "no-copy-paste", 0),
          ("Table 4: copy-paste beats none (M 0), fine-tuned mIoU", "depth", "no-copy-paste", 2),
          ("Table 2: lambda 1 above lambda 0.5 (73.55 vs 73.03), fine-tuned mIoU", "lam1", "depth", 2)]


def mean_interval(values, level=0.95):
    """(mean, low, high): Student's t interval of the mean of values; low = high = mean with fewer than 2."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return (float(v.mean()),) * 3 if len(v) else (float("nan"),) * 3
    half = scipy.stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def paired_interval(values, reference, level=0.95):
    """(mean, low, high) of values - reference over the seeds both hold (dicts seed -> value): Student's t
    interval of the mean paired difference; low = high = mean with fewer than 2 pairs."""
    return mean_interval([values[s] - reference[s] for s in sorted(values.keys() & reference.keys())], level)


def verdict(low, high):
    return "supported" if low > 0 else "contradicted" if high < 0 else "not distinguishable at this scale"


def read_ablations(abl):
    """{variant: {metric index: {seed: value in %}}} from ABL/<variant>_seed<s>/{cluster,finetune}/metrics.json."""
    results = {}
    for path in sorted(glob.glob(os.path.join(abl, "*_seed*"))):
        match = re.fullmatch(r"(.+)_seed(\d+)", os.path.basename(path))
        for i, (folder, key, _) in enumerate(METRICS):
            metrics = os.path.join(path, folder, "metrics.json")
            if match and os.path.exists(metrics):
                with open(metrics) as f:
                    value = 100 * json.load(f)[key]
                results.setdefault(match[1], {}).setdefault(i, {})[int(match[2])] = value
    return results


def ablation_tables(results, reference="depth"):
    """Markdown: per metric, each variant's seeds, mean +- std, and the paired difference to the reference with
    its 95 % interval; then one line per claim of the paper."""
    lines = []
    for i, (_, _, title) in enumerate(METRICS):
        lines += [f"\n| variant | {title}: mean +- std (seeds) | difference to ours, 95 % interval |", "|---|---|---|"]
        for name, label in VARIANTS:
            values = results.get(name, {}).get(i, {})
            if not values:
                continue
            v = np.array([values[s] for s in sorted(values)])
            std = f" +- {v.std(ddof=1):.2f}" if len(v) > 1 else ""
            seeds = ", ".join(f"{x:.1f}" for x in v)
            diff = "reference" if name == reference else \
                "{:+.2f} [{:+.2f}, {:+.2f}]".format(*paired_interval(values, results[reference][i]))
            lines.append(f"| {label} | {v.mean():.2f}{std} ({seeds}) | {diff} |")
    lines += ["\n| claim | difference, 95 % interval | at toy scale |", "|---|---|---|"]
    for claim, high, low, i in CLAIMS:
        if i in results.get(high, {}) and i in results.get(low, {}):
            mean, lo, hi = paired_interval(results[high][i], results[low][i])
            lines.append(f"| {claim} | {mean:+.2f} [{lo:+.2f}, {hi:+.2f}] | {verdict(lo, hi)} |")
    return "\n".join(lines)


def plot_ablations(results, path, reference="depth"):
    """docs/ablations.png: one panel per metric; per variant its seeds (dots), mean (bar) and the mean's 95 %
    interval (whiskers), drawn with Pillow."""
    names = [(n, label) for n, label in VARIANTS if n in results]
    row, left, panel_w, top = 34, 360, 300, 40
    image = Image.new("RGB", (left + len(METRICS) * (panel_w + 30), top + row * len(names) + 64), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=14)
    for j, (n, label) in enumerate(names):
        draw.text((8, top + j * row + 8), label, fill="black", font=font)
    draw.text((8, top + row * len(names) + 36), "toy city val; dots: seeds; tick: mean; line: 95 % interval of the "
              "mean; red: ours (the reference of the paired differences)", fill=(90, 90, 90), font=font)
    for i, (_, _, title) in enumerate(METRICS):
        x0 = left + i * (panel_w + 30)
        stats = {n: mean_interval(list(results[n].get(i, {}).values())) for n, _ in names}
        ends = [v for n, _ in names for v in list(results[n].get(i, {}).values()) + list(stats[n][1:])]
        step = next(s for s in (1, 2, 5, 10, 20) if (max(ends) - min(ends)) / s <= 5)
        lo, hi = step * np.floor(min(ends) / step - 0.5), step * np.ceil(max(ends) / step + 0.5)
        px = lambda v: x0 + (v - lo) / (hi - lo) * panel_w  # noqa: E731
        draw.text((x0, 8), f"{title} (%)", fill="black", font=font)
        draw.rectangle([x0, top - 4, x0 + panel_w, top + row * len(names)], outline=(180, 180, 180))
        for tick in np.arange(lo, hi + step / 2, step):
            draw.text((px(tick) - 8, top + row * len(names) + 6), f"{tick:.0f}", fill=(90, 90, 90), font=font)
        for j, (n, _) in enumerate(names):
            seeds = list(results[n].get(i, {}).values())
            if not seeds:
                continue
            (mean, low, high), y = stats[n], top + j * row + 15
            color = (200, 40, 40) if n == reference else (40, 80, 200)
            draw.line([px(low), y, px(high), y], fill=color, width=2)
            draw.line([px(mean), y - 9, px(mean), y + 9], fill=color, width=3)
            for v in seeds:
                draw.ellipse([px(v) - 3, y - 3 + 8, px(v) + 3, y + 3 + 8], fill=(120, 120, 120))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image.save(path)


def toy_table(work):
    """`bash pipeline.sh toy`'s table: depth, regions, clustering (pre-trained and random), fine-tuning."""
    load = lambda *p: json.load(open(os.path.join(work, *p)))  # noqa: E731
    d, g = load("depth", "eval.json"), load("regions", "eval.json")
    c, r = load("cluster", "metrics.json"), load("cluster_random", "metrics.json")
    lines = ["\n| result (toy city val) | value |", "|---|---|",
             f"| depth.py: abs_rel / a1 | {d['abs_rel']:.3f} / {d['a1']:.3f} |",
             f"| group.py: region purity / covering / regions per image | {g['purity']:.3f} / {g['covering']:.3f} / "
             f"{g['regions_per_image']:.1f} |",
             f"| cluster.py: pixel accuracy / mIoU (pre-trained) | {100 * c['pixel_accuracy']:.2f} / "
             f"{100 * c['miou']:.2f} |",
             f"| cluster.py: pixel accuracy / mIoU (random init, same architecture) | {100 * r['pixel_accuracy']:.2f}"
             f" / {100 * r['miou']:.2f} |"]
    miou = {}
    for init, suffix in (("swav", ""), ("scratch", "_scratch")):
        m = [100 * load(f"finetune{suffix}{'' if s == 0 else f'_seed{s}'}", "metrics.json")["miou"] for s in (0, 1)]
        miou[init] = dict(enumerate(m))
        lines.append(f"| finetune.py from {init}: mIoU, mean of seeds 0 and 1 ({m[0]:.2f}, {m[1]:.2f}) | "
                     f"{np.mean(m):.2f} |")
    lines.append("| finetune.py: swav - scratch, 95 % interval paired by seed (2 seeds: wide; toy-ablations has 5) | "
                 "{:+.2f} [{:+.2f}, {:+.2f}] |".format(*paired_interval(miou["swav"], miou["scratch"])))
    return "\n".join(lines + table1_lines(os.path.join(work, "ablations")))


def table1_lines(abl):
    """Table 1 with the seeds of toy-ablations: pre-trained (ours) - random initialization, paired by seed, per
    metric; a pointer to the preset while it has not run."""
    results = read_ablations(abl) if os.path.isdir(abl) else {}
    if not {"depth", "random-init"} <= results.keys():
        return ["| Table 1 with 5 seeds: pre-trained - random init | run `bash pipeline.sh toy-ablations` |"]
    lines = []
    for i, (folder, _, title) in enumerate(METRICS):
        pre, scratch = results["depth"].get(i, {}), results["random-init"].get(i, {})
        mean, lo, hi = paired_interval(pre, scratch)
        table = "Table 1" if folder == "cluster" else "Table 2"  # clustering, or fine-tuning from scratch
        lines.append(f"| {table} ({len(pre.keys() & scratch.keys())} seeds of toy-ablations): pre-trained - random "
                     f"init, {title}, 95 % interval | {mean:+.2f} [{lo:+.2f}, {hi:+.2f}]: {verdict(lo, hi)} |")
    return lines


def instance_table(work):
    """`bash pipeline.sh toy-instance`'s table: mask AP / AP50 overall and per present class of each run, the
    two seeds' means, and the paired interval of swav - scratch."""
    def load(init, seed):
        folder = f"finetune_instance{'' if init == 'swav' else '_scratch'}{'' if seed == 0 else f'_seed{seed}'}"
        with open(os.path.join(work, folder, "metrics.json")) as f:
            return json.load(f)
    runs = {(init, s): load(init, s) for init in ("swav", "scratch") for s in (0, 1)}
    present = [c for c, v in runs["swav", 0]["ap_per_class"].items() if v is not None]
    pct = lambda v: "absent" if v is None else f"{100 * v:.2f}"  # noqa: E731
    cells = lambda get: [f"{pct(get('ap'))} / {pct(get('ap50'))}"] + [  # noqa: E731
        f"{pct(get('ap_per_class', c))} / {pct(get('ap50_per_class', c))}" for c in present]
    lines = ["\n| Mask R-CNN (toy city val) | mask AP / AP50 | " + " | ".join(f"{c} AP / AP50" for c in present)
             + " |", "|---|---|" + "---|" * len(present)]
    for (init, s), m in runs.items():
        lines.append(f"| from {init}, seed {s} | " + " | ".join(cells(lambda k, c=None: m[k] if c is None
                                                                        else m[k][c])) + " |")
    for init in ("swav", "scratch"):
        mean = lambda k, c=None: np.mean([runs[init, s][k] if c is None else runs[init, s][k][c]  # noqa: E731
                                          for s in (0, 1)])
        lines.append(f"| from {init}, mean of seeds 0 and 1 | " + " | ".join(cells(mean)) + " |")
    ap50 = {init: {s: 100 * runs[init, s]["ap50"] for s in (0, 1)} for init in ("swav", "scratch")}
    lines.append("\nAP50 swav - scratch, 95 % interval paired by seed (2 seeds): {:+.2f} [{:+.2f}, {:+.2f}]"
                 .format(*paired_interval(ap50["swav"], ap50["scratch"])))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=["toy", "ablations", "instance"], help="which preset's outputs to summarize")
    p.add_argument("folder", help="toy and instance: their WORK; ablations: WORK/ablations")
    p.add_argument("--plot", default="docs/ablations.png", help="ablations: where the plot goes")
    args = p.parse_args(argv)
    if args.preset in ("toy", "instance"):
        print((toy_table if args.preset == "toy" else instance_table)(args.folder))
        return
    results = read_ablations(args.folder)
    if "depth" not in results:
        raise SystemExit(f"report.py: no {args.folder}/depth_seed*/cluster/metrics.json: run `bash pipeline.sh "
                         "toy-ablations` first")
    print(ablation_tables(results))
    plot_ablations(results, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
