"""Does the advisor pick well on data it was not tuned on? Every strategy on a grid, thresholds chosen leave-one-dataset-out.

    python benchmarks/advisor_grid.py [--datasets ...] [--sizes 10 30 100 all] [--seeds 0 1 2]
                                      [--epochs 6] [--runs grid.jsonl] [--json results.json]

Every image dataset in ../shared/data (hymenoptera, breastmnist, cub_birds40, rsscn7), with the
real MobileNetV1 x0.25. A cell is (dataset, images per class, seed): the training split is a
stratified subsample drawn with that seed (a size at or above the largest class is "all", and a
size that gives the same split as a larger one is left out), and freeze, partial, full, lp-ft and
gradual (--unfreeze-every 1) train on it with the same epochs, seed and defaults, scored by val
accuracy of their best checkpoint (BreastMNIST: its val and test splits together, 234 images, so
one image is not half a point). The advisor measures the cell's training images once; its measurements are kept, so its
decision can be re-made offline for any thresholds.

Then rules are chosen from families of candidates by leave-one-dataset-out: for each dataset, the
candidate that picks best on the other three is scored on it. A pick is good when its accuracy,
averaged over the seeds, is within 1 point of the best strategy's average. The families, simplest
first: one strategy always; a size threshold alone; size with a similarity exception (small data
far from the pretraining domain retrains from a better earlier stage). The advisor as shipped
(`advisor.decide` with `advisor.THRESHOLDS`) is scored on every cell beside them.

Each training run is appended to --runs as it finishes; a second invocation with the same file
trains only what is missing (and `--analyse-only` trains nothing).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from freeze_head import SHARED, breastmnist_folder, subsample  # noqa: E402

BACKBONE = "mobilenetv1_025"
PLUGIN = SHARED / "weights" / f"{BACKBONE}.py"
STRATEGIES = ("freeze", "partial", "full", "lp-ft", "gradual")
DATASETS = ("hymenoptera", "breastmnist", "cub_birds40", "rsscn7")
GOOD = 0.01  # within 1 point of the best


# --- Collecting ---------------------------------------------------------------------------------

def sources(tmp: Path, names) -> dict[str, Path]:
    """Each dataset as a train/val folder; BreastMNIST's val is its val and test splits together."""
    out = {n: SHARED / "data" / n for n in names if n != "breastmnist"}
    if "breastmnist" in names:
        split = breastmnist_folder(tmp / "breastmnist-split")
        root = tmp / "breastmnist"
        root.mkdir()
        (root / "train").symlink_to(split / "train", target_is_directory=True)
        for part in ("val", "test"):
            for cls in (split / part).iterdir():
                (root / "val" / cls.name).mkdir(parents=True, exist_ok=True)
                for f in cls.iterdir():
                    (root / "val" / cls.name / f"{part}_{f.name}").symlink_to(f)
        out["breastmnist"] = root
    return out


def sizes_of(src: Path, sizes: list[str]) -> list[tuple[str, int]]:
    """(label, per_class) for each asked size that gives a split of its own."""
    counts = [len(list(c.iterdir())) for c in (src / "train").iterdir() if c.is_dir()]
    out, seen = [], set()
    for label in sorted(sizes, key=lambda s: float("inf") if s == "all" else int(s), reverse=True):
        n = max(counts) if label == "all" else int(label)
        split = tuple(min(n, c) for c in counts)
        if split in seen:
            continue
        seen.add(split)
        out.append(("all" if n >= max(counts) else label, n))
    return out[::-1]


def measure(data: Path, seed: int) -> dict:
    from transferkit.pipelines.advise import advise

    advice, info = advise(str(data), BACKBONE, backbone_plugin=str(PLUGIN), seed=seed, workers=2, progress=False)
    return {"pick": advice.strategy, "measurements": advice.measurements.to_dict(), "groups": info["groups"],
            "train_images": info["train_images"]}


def train(data: Path, out: Path, strategy: str, epochs: int, seed: int) -> dict:
    import transferkit

    t0 = time.perf_counter()
    report = transferkit.fit(data, out=out, backbone=BACKBONE, backbone_plugin=str(PLUGIN), finetune=strategy,
                             epochs=epochs, patience=0, seed=seed, workers=2, overwrite=True, progress=False).report
    return {"accuracy": report["accuracy"], "seconds": round(time.perf_counter() - t0, 1)}


def collect(args, done: dict) -> None:
    """Train every missing (dataset, size, seed, strategy) and append it to --runs."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, args.runs.open("a") as log:
        tmp = Path(tmp)
        src = sources(tmp, args.datasets)
        # Seeds outermost: an interrupted collection still has every cell at the first seeds.
        for seed in args.seeds:
            for name in args.datasets:
                for label, per_class in sizes_of(src[name], args.sizes):
                    key = (name, label, seed)
                    todo = [s for s in args.strategies if key + (s,) not in done]
                    if not todo and key + ("advice",) in done:
                        continue
                    data = subsample(src[name], tmp / f"{name}-{label}-{seed}", per_class, seed)
                    rows = []
                    if key + ("advice",) not in done:
                        rows.append({"kind": "advice", **measure(data, seed)})
                    for s in todo:
                        rows.append({"kind": s, **train(data, tmp / f"run-{name}-{label}-{seed}-{s}", s, args.epochs,
                                                        seed)})
                        print(f"{name:<12} {label:>4}/class seed {seed}  {s:<8} {rows[-1]['accuracy']:.3f}"
                              f"  ({rows[-1]['seconds']:.0f} s)", flush=True)
                    for r in rows:
                        r.update(dataset=name, per_class=label, seed=seed, epochs=args.epochs)
                        done[key + (r["kind"],)] = r
                        log.write(json.dumps(r) + "\n")
                    log.flush()


def load_runs(path: Path) -> dict:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r["dataset"], r["per_class"], r["seed"], r["kind"])] = r
    return out


# --- Judging rules ------------------------------------------------------------------------------

def cells(runs: dict, strategies) -> list[dict]:
    """One entry per (dataset, size): each strategy's accuracy per seed, and the advisor's inputs per seed."""
    grouped: dict = {}
    for (name, label, seed, kind), r in runs.items():
        grouped.setdefault((name, label), {}).setdefault(seed, {})[kind] = r
    out = []
    for (name, label), by_seed in grouped.items():
        seeds = sorted(s for s, k in by_seed.items() if "advice" in k and all(x in k for x in strategies))
        if not seeds:
            continue
        acc = {s: [by_seed[sd][s]["accuracy"] for sd in seeds] for s in strategies}
        out.append({"dataset": name, "per_class": label, "seeds": seeds, "accuracy": acc,
                    "mean": {s: statistics.fmean(v) for s, v in acc.items()},
                    "advice": [by_seed[sd]["advice"] for sd in seeds],
                    "train_images": by_seed[seeds[0]]["advice"]["train_images"]})
    order = {n: i for i, n in enumerate(DATASETS)}
    return sorted(out, key=lambda c: (order.get(c["dataset"], 99),
                                      float("inf") if c["per_class"] == "all" else int(c["per_class"])))


def judged(cell: dict, picks: list[str]) -> tuple[float, bool]:
    """The picks' accuracy (seed by seed, averaged) and whether it is within GOOD of the best mean."""
    got = statistics.fmean(cell["accuracy"][p][i] for i, p in enumerate(picks))
    return got, got >= max(cell["mean"].values()) - GOOD - 1e-9


def advisor_rule(thresholds):
    """The shipped ``decide`` re-made offline from a cell's recorded measurements."""
    from transferkit.backbones.advisor import Measurements, decide

    def rule(advice: dict) -> str:
        m = Measurements.from_dict(advice["measurements"])
        groups = advice["groups"]
        return decide(m, num_groups=len(groups), group_labels=groups, thresholds=thresholds).strategy
    return rule


def size_rule(n: float, large: str = "partial"):
    return lambda advice: "freeze" if advice["measurements"]["median_per_class"] < n else large


def similarity_rule(n: float, different: float, margin: float):
    """The size rule, except that small data far from the pretraining domain (normalised probe gain
    below `different`) retrains from an earlier stage whose probe beats the final features by
    `margin` (the advisor's rule before this grid)."""
    def rule(advice: dict) -> str:
        m = advice["measurements"]
        if m["median_per_class"] >= n:
            return "partial"
        stages = m.get("stage_accuracy") or {}
        final, earlier = stages.get("final"), [v for k, v in stages.items() if k != "final" and v is not None]
        gain = m.get("similarity")
        far = gain is not None and gain < different
        return "partial" if far and earlier and final is not None and max(earlier) - final >= margin else "freeze"
    return rule


def rule_families(strategies) -> dict[str, list[tuple[str, object]]]:
    """Named families of candidate rules, simplest first; each candidate is (description, rule)."""
    sizes = (15, 20, 25, 40, 50, 75, 110, 150, 200, 300)
    fams = {"one strategy always": [(s, (lambda s: lambda a: s)(s)) for s in strategies],
            "size alone": [(f"freeze below {n}/class, else {big}", size_rule(n, big))
                           for n in sizes for big in ("partial", "full") if big in strategies]}
    fams["size + similarity"] = [
        (f"freeze below {n}/class unless normalised gain < {d:g} and an earlier stage is +{m:g}, else partial",
         similarity_rule(n, d, m))
        for n, d, m in itertools.product(sizes, (0.2, 0.3, 0.4, 0.5), (0.0, 0.03, 0.06))]
    return fams


def score(rule, cs: list[dict]) -> tuple[int, float]:
    """(good cells, mean accuracy of the picks)."""
    res = [judged(c, [rule(a) for a in c["advice"]]) for c in cs]
    return sum(g for _, g in res), statistics.fmean(a for a, _ in res)


def best_of(family, cs):
    """The candidate with the most good cells, then the highest mean accuracy; ties keep the first."""
    return max(family, key=lambda cand: score(cand[1], cs))


def lodo(family, cs, datasets) -> dict:
    """Leave-one-dataset-out: thresholds fitted on the other datasets, judged on the held-out one."""
    out = {}
    for d in datasets:
        fit_on = [c for c in cs if c["dataset"] != d]
        held = [c for c in cs if c["dataset"] == d]
        if not fit_on or not held:
            continue
        desc, rule = best_of(family, fit_on)
        good, acc = score(rule, held)
        out[d] = {"rule": desc, "good": good, "cells": len(held), "mean_accuracy": acc}
    return out


# --- Report -------------------------------------------------------------------------------------

def report(cs: list[dict], strategies, epochs) -> dict:
    from transferkit.backbones.advisor import THRESHOLDS

    datasets = list(dict.fromkeys(c["dataset"] for c in cs))
    print(f"\nval accuracy, mean ± spread (sd) over seeds ({epochs} epochs, MobileNetV1 x0.25);"
          " * = advisor's pick (every seed), ^ = best mean")
    print(f"{'dataset':<12} {'per class':>9} {'train':>6} {'seeds':>5} "
          + " ".join(f"{s:>14}" for s in strategies) + "   pick ok")
    current = advisor_rule(THRESHOLDS)
    for c in cs:
        picks = [current(a) for a in c["advice"]]
        best = max(c["mean"].values())
        row = []
        for s in strategies:
            v = c["accuracy"][s]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            mark = ("*" if set(picks) == {s} else "+" if s in picks else " ") + ("^" if c["mean"][s] == best else " ")
            row.append(f"{c['mean'][s]:.3f}±{sd:.3f}{mark}")
        print(f"{c['dataset']:<12} {c['per_class']:>9} {c['train_images']:>6} {len(c['seeds']):>5} " + " ".join(row)
              + f"   {'yes' if judged(c, picks)[1] else 'no'}")
    print("  (+ = picked in some seeds)")

    out = {"cells": cs, "families": {}}
    print(f"\nrules: good picks (within {100 * GOOD:.0f} point of the best mean) out of {len(cs)} cells")
    print(f"{'rule family':<26} {'in-sample':>10} {'LODO':>10}  chosen in sample")
    for fam, cands in rule_families(strategies).items():
        desc, rule = best_of(cands, cs)
        good, acc = score(rule, cs)
        held = lodo(cands, cs, datasets)
        lgood = sum(h["good"] for h in held.values())
        lcells = sum(h["cells"] for h in held.values())
        print(f"{fam:<26} {good:>4}/{len(cs):<5} {lgood:>4}/{lcells:<5}  {desc}")
        for d, h in held.items():
            print(f"{'':<26} {'':>10} {'':>10}    held out {d}: {h['good']}/{h['cells']} with {h['rule']}")
        out["families"][fam] = {"in_sample": {"rule": desc, "good": good, "cells": len(cs), "mean_accuracy": acc},
                                "lodo": held}
    good, acc = score(current, cs)
    print(f"\nthe advisor as shipped ({THRESHOLDS.describe()}): {good}/{len(cs)} good, mean pick accuracy {acc:.3f}")
    out["shipped"] = {"thresholds": THRESHOLDS.describe(), "good": good, "cells": len(cs), "mean_accuracy": acc}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
    ap.add_argument("--sizes", nargs="*", default=["10", "30", "100", "all"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--runs", type=Path, default=Path(__file__).with_name("results-advisor-grid-runs.jsonl"),
                    help="every run, one JSON line each; a rerun trains only what is missing")
    ap.add_argument("--analyse-only", action="store_true", help="train nothing; judge the runs in --runs")
    ap.add_argument("--json", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args()
    if not (SHARED / "data").is_dir() or not PLUGIN.is_file():
        print(f"needs {SHARED / 'data'} and {PLUGIN}", file=sys.stderr)
        return 2
    runs = load_runs(args.runs)
    if not args.analyse_only:
        collect(args, runs)
    runs = {k: v for k, v in runs.items() if k[0] in args.datasets and v.get("epochs", args.epochs) == args.epochs}
    cs = cells(runs, args.strategies)
    if not cs:
        print(f"no complete cells in {args.runs}", file=sys.stderr)
        return 2
    out = report(cs, args.strategies, args.epochs)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
