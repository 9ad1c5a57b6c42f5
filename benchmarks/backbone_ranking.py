"""Does the ranking pick the backbone that fits best? Ranked by `advise`, against fitted accuracies.

    python benchmarks/backbone_ranking.py [--fitted benchmarks/results-freeze-head.json] [--per-class 100]

For every image dataset in ../shared/data, the three real backbones are ranked by
`rank_backbones` on the same training subsample that `benchmarks/freeze_head.py` fitted (100
per class, seed 0), and the ranking by expected freeze accuracy, and by LogME alone, is compared
with the held-out accuracies those fits reached (read from that script's --json output). Prints
each dataset's order and Kendall's tau, and their mean.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from freeze_head import BACKBONES, SHARED, breastmnist_folder, subsample  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fitted", type=Path, default=Path(__file__).with_name("results-freeze-head.json"))
    ap.add_argument("--per-class", type=int, default=100)
    args = ap.parse_args()
    if not args.fitted.is_file() or not (SHARED / "data").is_dir():
        print(f"needs {args.fitted} (run benchmarks/freeze_head.py --json first) and {SHARED / 'data'}",
              file=sys.stderr)
        return 2
    import logging

    from scipy.stats import kendalltau

    from transferkit.pipelines.advise import rank_backbones, ranking_table

    logging.basicConfig(level=logging.WARNING)
    fitted = [r for r in json.loads(args.fitted.read_text()) if r["per_class"] == args.per_class]
    datasets = list(dict.fromkeys(r["dataset"] for r in fitted))
    names = ",".join(BACKBONES)
    plugins = ",".join(str(SHARED / "weights" / f"{b}.py") for b in BACKBONES)
    taus = {"expected freeze accuracy": [], "LogME": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in datasets:
            src = breastmnist_folder(tmp / "breastmnist") if name == "breastmnist" else SHARED / "data" / name
            data = subsample(src, tmp / f"{name}-{args.per_class}", args.per_class, 0)
            rows = rank_backbones(str(data), names, backbone_plugin=plugins, workers=2, progress=False)
            acc = {r["backbone"]: r["transferkit"] for r in fitted if r["dataset"] == name}
            order = [b for b in BACKBONES if b in acc]
            truth = [acc[b] for b in order]
            by = {r["backbone"]: r for r in rows}
            tau_probe = kendalltau([by[b]["expected_freeze_accuracy"] for b in order], truth).statistic
            tau_logme = kendalltau([by[b]["logme"] for b in order], truth).statistic
            taus["expected freeze accuracy"].append(tau_probe)
            taus["LogME"].append(tau_logme)
            print(f"\n{name} ({args.per_class}/class)\n{ranking_table(rows)}")
            print("fitted held-out accuracy: " + ", ".join(f"{b} {acc[b]:.3f}" for b in sorted(acc, key=acc.get,
                                                                                              reverse=True)))
            print(f"Kendall's tau against it: expected freeze accuracy {tau_probe:+.2f}, LogME {tau_logme:+.2f}",
                  flush=True)
    print()
    for key, values in taus.items():
        print(f"mean Kendall's tau, {key}: {sum(values) / len(values):+.2f} over {len(values)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
