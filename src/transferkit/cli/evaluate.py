"""`transferkit evaluate` and `transferkit predict`."""
from __future__ import annotations

import argparse
from pathlib import Path

from transferkit.cli.common import Formatter as _Formatter
from transferkit.cli.common import progress

_TTA_HELP = ("test-time views: plain, hflip, five-crop, ten-crop, multiscale[:s1,s2,...], joined with '+'"
             " (e.g. hflip+multiscale:0.9,1.1)")
_ENSEMBLE_HELP = ("none (the --checkpoint weights), ema (its averaged weights, fit --ema), swa (fit --swa),"
                  " snapshots (fit --snapshots M), all (every model the run holds)")


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="metrics of a trained run on its val split or a folder, with TTA and ensembles",
        formatter_class=_Formatter,
        description="Accuracy, top-5 accuracy (5+ classes), macro-F1, NLL and ECE of every combination of"
                    " --tta and --ensemble, in one table and RUN_DIR/evaluation.json; the confusion matrix"
                    " and the reliability diagram of the best combination go to RUN_DIR/plots.",
        epilog="example: transferkit evaluate runs/x --tta plain,hflip,ten-crop --ensemble none,ema,snapshots")
    p.add_argument("run_dir", help="a run directory written by `transferkit fit`")
    p.add_argument("data", nargs="?", help="image folder (default: the run's saved split)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="which split to evaluate")
    p.add_argument("--checkpoint", default="best", help="best, last, or another name in RUN_DIR/checkpoints")
    p.add_argument("--tta", default="plain",
                   help=f"comma-separated view specs to compare; a number after 'multiscale:' continues its"
                        f" scales. {_TTA_HELP}")
    p.add_argument("--ensemble", default="none", help=f"comma-separated ensembles to compare: {_ENSEMBLE_HELP}")
    p.add_argument("--merge", choices=("mean", "geometric", "max"), default="mean",
                   help="how probabilities merge over views and models")
    p.add_argument("--batch-size", type=int, default=None,
                   help="views per forward pass (images x TTA views); default: the run's batch size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--accelerator", default="auto", help="auto (a GPU when there is one), cpu, gpu")
    p.add_argument("--calibrate", action="store_true",
                   help="first fit a temperature for --checkpoint on the run's val split by NLL and store it in"
                        " the checkpoint (evaluate, predict and the Python API then apply it)")
    p.add_argument("--select", action="store_true",
                   help="record the combination with the lowest val NLL as the run's default for predict"
                        " (RUN_DIR/selected.json)")
    p.add_argument("--per-image", choices=("best", "all"), default="best",
                   help="per-image rows (path, label, predicted, probability, loss, correct, top-k) in"
                        " RUN_DIR/predictions-SPLIT.csv for the best combination; all: also"
                        " predictions-SPLIT-TTA-ENSEMBLE.csv for every combination")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from transferkit.pipelines.evaluate.evaluation import evaluate_run, results_table

    body = evaluate_run(args.run_dir, args.data, split=args.split, checkpoint=args.checkpoint, tta=args.tta,
                        ensemble=args.ensemble, merge=args.merge, batch_size=args.batch_size,
                        workers=args.workers, progress=progress(), accelerator=args.accelerator,
                        calibrate=args.calibrate, select=args.select, per_image=args.per_image)
    if "calibration" in body:
        c = body["calibration"]
        print(f"temperature {c['temperature']:.3f} (fitted on val): NLL {c['before']['nll']:.4f} ->"
              f" {c['after']['nll']:.4f}, ECE {c['before']['ece']:.4f} -> {c['after']['ece']:.4f}")
    print(f"{args.split} split, checkpoint {args.checkpoint}, merge {args.merge} (* best)")
    print(results_table(body))
    if "selected" in body:
        s = body["selected"]
        print(f"selected for predict: --tta {s['tta']} --ensemble {s['ensemble']} (val NLL {s['nll']:.4f})")
    confused = ", ".join(f"{c['label']} as {c['predicted']} ({c['count']})" for c in body["most_confused"][:3])
    print(f"most confused: {confused or 'none'}; top losses and every image's row in"
          f" {Path(args.run_dir) / f'predictions-{args.split}.csv'}")
    print(f"written: {Path(args.run_dir) / 'evaluation.json'}")
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict labels for image files and folders", formatter_class=_Formatter)
    p.add_argument("run_dir", help="a run directory written by `transferkit fit`, or an onnx or torchscript folder"
                                   " written by `transferkit export`")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument("--top-k", type=int, default=1, help="also write the next K-1 labels and probabilities")
    p.add_argument("--checkpoint", default="best", help="best, last, or another name in RUN_DIR/checkpoints")
    p.add_argument("--tta", default=None,
                   help=f"one view spec (default: what `evaluate --select` chose, else plain). {_TTA_HELP}")
    p.add_argument("--ensemble", default=None, choices=("none", "ema", "swa", "snapshots", "all"),
                   help=f"{_ENSEMBLE_HELP} (default: what `evaluate --select` chose, else none)")
    p.add_argument("--merge", choices=("mean", "geometric", "max"), default=None,
                   help="how probabilities merge over views and models (default: the selected, else mean)")
    p.add_argument("--batch-size", type=int, default=32, help="views per forward pass (images x TTA views)")
    p.add_argument("--workers", type=int, default=argparse.SUPPRESS,
                   help="DataLoader workers that read the images (default: min(4, CPU count); none when the"
                        " images fit one batch)")
    p.add_argument("--accelerator", default="auto", help="auto (a GPU when there is one), cpu, gpu")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from transferkit.pipelines.evaluate.prediction import predict_paths

    out = predict_paths(args.run_dir, args.paths, args.out, top_k=args.top_k, checkpoint=args.checkpoint,
                        batch_size=args.batch_size, workers=getattr(args, "workers", None), progress=progress(),
                        tta=args.tta, ensemble=args.ensemble, merge=args.merge, accelerator=args.accelerator)
    print(f"predictions written to {out}")
    return 0
