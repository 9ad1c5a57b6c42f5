"""`transferkit export`."""
from __future__ import annotations

from transferkit.cli.common import Formatter


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="a trained run as ONNX, TorchScript or a timm folder, to deploy without the training stack",
        formatter_class=Formatter,
        description="Writes the network (with any stored temperature) and, for onnx and torchscript, the --tta views"
                    " and their merge in one graph with a dynamic batch dimension; transferkit-export.json beside it"
                    " says how to prepare images. `transferkit predict EXPORT_DIR ...` predicts from an onnx or"
                    " torchscript export. onnx needs `pip install 'transferkit[export]'`.",
        epilog="example: transferkit export runs/x --format onnx --tta hflip --out deploy/")
    p.add_argument("run_dir", help="a run directory written by `transferkit fit`")
    p.add_argument("--format", choices=("onnx", "torchscript", "timm"), default="onnx",
                   help="onnx (model.onnx), torchscript (model.pt), timm (model.safetensors + config.json, loaded by"
                        " timm.create_model('local-dir:DIR', pretrained=True))")
    p.add_argument("--checkpoint", choices=("best", "last", "ema", "swa"), default="best",
                   help="which weights: best.ckpt, last.ckpt, the EMA weights of best.ckpt (fit --ema), swa.ckpt")
    p.add_argument("--tta", default="plain", help="one view spec baked into the graph, e.g. hflip or ten-crop")
    p.add_argument("--merge", choices=("mean", "geometric", "max"), default="mean", help="how the views merge")
    p.add_argument("--out", default=None, help="folder to write (default: RUN_DIR/export-FORMAT)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from transferkit.pipelines.evaluate.export import export_run

    out = export_run(args.run_dir, args.format, checkpoint=args.checkpoint, tta=args.tta, merge=args.merge,
                     out=args.out)
    print(f"exported {args.checkpoint} as {args.format} to {out}")
    return 0
