"""`transferkit evaluate` and `transferkit predict`."""
from __future__ import annotations

from pathlib import Path

from transferkit.cli.common import Formatter as _Formatter
from transferkit.cli.common import progress


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a trained run on its val split or a folder",
                       formatter_class=_Formatter)
    p.add_argument("run_dir", help="a run directory written by `transferkit fit`")
    p.add_argument("data", nargs="?", help="image folder (default: the run's saved split)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="which split to evaluate")
    p.add_argument("--checkpoint", default="best", help="best, last, or another name in RUN_DIR/checkpoints")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from transferkit.pipelines.inference import evaluate_run

    body = evaluate_run(args.run_dir, args.data, split=args.split, checkpoint=args.checkpoint,
                        batch_size=args.batch_size, workers=args.workers, progress=progress())
    rows = body["results"]
    print(f"{'split':<6} {'tta':<10} {'ensemble':<10} {'accuracy':>9} {'macro_f1':>9} {'nll':>8} {'ece':>7} {'n':>6}")
    for r in rows:
        print(f"{r['split']:<6} {r['tta']:<10} {r['ensemble']:<10} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f}"
              f" {r['nll']:>8.4f} {r['ece']:>7.4f} {r['count']:>6d}")
    print(f"written: {Path(args.run_dir) / 'evaluation.json'}")
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict labels for image files and folders", formatter_class=_Formatter)
    p.add_argument("run_dir", help="a run directory written by `transferkit fit`")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument("--top-k", type=int, default=1, help="also write the next K-1 labels and probabilities")
    p.add_argument("--checkpoint", default="best", help="best, last, or another name in RUN_DIR/checkpoints")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from transferkit.pipelines.inference import predict_paths

    out = predict_paths(args.run_dir, args.paths, args.out, top_k=args.top_k, checkpoint=args.checkpoint,
                        batch_size=args.batch_size, workers=args.workers, progress=progress())
    print(f"predictions written to {out}")
    return 0
