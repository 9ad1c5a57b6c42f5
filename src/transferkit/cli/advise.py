"""`transferkit advise`."""
from __future__ import annotations

import json

from transferkit.cli.common import Formatter, progress, quiet_lightning


def add_advise(sub) -> None:
    p = sub.add_parser("advise", help="measure a dataset against a backbone and recommend a strategy",
                       formatter_class=Formatter, description=(
                           "Runs the frozen backbone once over the training split and measures size and"
                           " similarity (linear and k-NN probes, LogME, BatchNorm shift, per-stage probes);"
                           " prints the strategy `fit --finetune auto` would use and why."))
    p.add_argument("data", help="image folder, as for fit")
    p.add_argument("--backbone", "--model", dest="backbone", default="resnet50",
                   help="any timm model name; several, comma-separated, are ranked for this data")
    p.add_argument("--weights", default=None, help="local .safetensors/.pth with the backbone's weights")
    p.add_argument("--backbone-plugin", default=None,
                   help="Python file that registers extra timm models (comma-separated: one per --backbone)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="measure random weights (a baseline, not advice)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.2, help="as for fit, to measure the same split")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto", help="where the frozen pass runs: auto, cpu, gpu")
    p.add_argument("--json", action="store_true", help="print the advice and its measurements as JSON")
    p.set_defaults(func=_cmd_advise)


def _cmd_advise(args) -> int:
    from transferkit.pipelines.settings import FitConfig

    settings = dict(pretrained=args.pretrained, weights=args.weights, backbone_plugin=args.backbone_plugin,
                    image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed,
                    batch_size=args.batch_size, workers=args.workers, accelerator=args.accelerator)
    FitConfig.build({"data": args.data, "backbone": args.backbone, **settings}, source="cli")  # before heavy imports
    quiet_lightning(args.verbose)
    if "," in args.backbone:
        from transferkit.pipelines.advise import rank_backbones, ranking_table

        rows = rank_backbones(args.data, args.backbone, progress=progress(), source="cli", **settings)
        print(json.dumps(rows, indent=2) if args.json else ranking_table(rows))
        if not args.json:
            print(f"`transferkit fit {args.data} --backbone {args.backbone}` fits {rows[0]['backbone']}")
        return 0
    from transferkit.pipelines.advise import advise

    advice, info = advise(args.data, args.backbone, progress=progress(), source="cli", **settings)
    if args.json:
        print(json.dumps({**info, **advice.to_dict()}, indent=2))
    else:
        print(advice.summary())
        print(f"measured {info['train_images']} training images in {info['seconds']:.1f} s;"
              f" layer groups: {', '.join(info['groups'])}")
    return 0
