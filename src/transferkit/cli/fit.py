"""`transferkit fit` and `transferkit demo`."""
from __future__ import annotations

import argparse
from pathlib import Path

from transferkit.cli.common import Formatter as _Formatter
from transferkit.cli.common import progress, quiet_lightning
from transferkit.errors import UserError

_NOT_SETTINGS = ("func", "config", "resume", "verbose", "command", "print_config")


def _lr(text: str) -> float | str:
    if text == "find":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'find'") from None


def add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fine-tune a pretrained backbone on an image folder",
                       formatter_class=_Formatter, argument_default=argparse.SUPPRESS, description=(
                           "Fine-tune a timm backbone on DATA: either DATA/<class>/*.jpg (a stratified"
                           " validation split is drawn) or DATA/train/<class>/ + DATA/val/<class>/"
                           " (+ optional DATA/test/<class>/)."))
    _fit_options(p)
    p.set_defaults(func=_cmd_fit)


def add_lr_find(sub) -> None:
    p = sub.add_parser("lr-find", help="sweep the learning rate on DATA with fit's settings and plot it, no training",
                       formatter_class=_Formatter, argument_default=argparse.SUPPRESS, description=(
                           "Runs fit's steps up to training, then Lightning's LR finder over what the strategy"
                           " trains (100 steps, rate 1e-6 to 1, exponential); writes OUT/plots/lr_find.png,"
                           " OUT/lr_find.json and OUT/config.yaml, and prints the suggested head rate"
                           " (`fit --lr find` does the same and then trains with it)."))
    _fit_options(p)
    p.set_defaults(func=_cmd_lr_find)


def _fit_options(p) -> None:
    """The settings fit takes (lr-find takes the same)."""
    from transferkit.pipelines.settings import CLASS_WEIGHTS, FINETUNE_CHOICES, OPTIMIZERS, SAMPLERS, SCHEDULES, FitConfig

    d = FitConfig()
    S = argparse.SUPPRESS
    p.add_argument("data", nargs="?", help="image folder")
    p.add_argument("--config", default=None, help="replay a run's config.yaml (arguments given here override it)")
    p.add_argument("--out", help="run directory (default: runs/<backbone>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue an interrupted run")
    p.add_argument("--print-config", action="store_true", default=False,
                   help="print the resolved settings as config.yaml would hold them (replay with --config) and exit")
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", "--model", dest="backbone",
                   help=f"any timm model name, or hf-hub:ORG/NAME, local-dir:FOLDER (default {d.backbone})")
    g.add_argument("--weights", help="local .safetensors/.pth file with the backbone's pretrained weights")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="train from random weights (only when you mean it)")
    g.add_argument("--backbone-plugin", help="Python file that registers extra timm models")
    g.add_argument("--image-size", type=int, help="input size (default: the backbone's pretrained size)")
    g = p.add_argument_group("fine-tuning strategy")
    g.add_argument("--finetune", choices=FINETUNE_CHOICES, help=f"strategy (default {d.finetune})")
    g.add_argument("--unfreeze-every", type=int, metavar="E",
                   help=f"gradual: the head trains alone for E epochs, then one more layer group from the top joins"
                        f" every E epochs, the rate warming up again at each (default {d.unfreeze_every})")
    g.add_argument("--trainable-groups", type=int,
                   help=f"partial: how many top layer groups train (default {d.trainable_groups})")
    g.add_argument("--head-solver", choices=("lbfgs", "sgd"),
                   help="the frozen head (freeze, lp-ft's probe): lbfgs solves it on the cached features, L2 chosen"
                        " by cross-validation; sgd trains it for --epochs (default: lbfgs unless Mixup/CutMix, EMA,"
                        " SWA or snapshots need steps)")
    g.add_argument("--layer-decay", type=float,
                   help="lr factor per layer group below the head (default 0.5; 1.0 from random weights)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=_lr, help="head learning rate (default: by strategy and optimizer, see README);"
                                           " find: the LR finder's suggestion")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"(default {d.optimizer}) through timm's factory; sgd is plain SGD, momentum and nesterov add"
                        " --momentum; the default rate scales with the optimizer (README)")
    g.add_argument("--momentum", type=float, help=f"momentum, nesterov and rmsprop (default {d.momentum})")
    g.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    g.add_argument("--schedule", choices=SCHEDULES, help=f"after --warmup-epochs (default {d.schedule})")
    g.add_argument("--warmup-epochs", type=float, help=f"linear warmup (default {d.warmup_epochs})")
    g.add_argument("--step-epochs", type=int, help="step: multiply the rate by --step-gamma every N epochs"
                                                    " (default: a third of the run)")
    g.add_argument("--step-gamma", type=float, help=f"step: the factor (default {d.step_gamma})")
    g.add_argument("--label-smoothing", type=float, help=f"(default {d.label_smoothing})")
    g.add_argument("--dropout", type=float, help="dropout before the new head (timm's drop_rate; default 0)")
    g.add_argument("--drop-path", type=float, help="stochastic depth (timm's drop_path_rate; default 0)")
    g.add_argument("--class-weights", choices=CLASS_WEIGHTS,
                   help="balanced: weigh each class by n / (classes x its images) in the loss (default none)")
    g.add_argument("--sampler", choices=SAMPLERS,
                   help="balanced: draw every class equally often in each epoch (default shuffle)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value (default: off)")
    g.add_argument("--epochs", type=int, help=f"(default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    g.add_argument("--patience", type=int, help=f"early stopping on val accuracy; 0 turns it off (default {d.patience})")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--calibrate", choices=("temperature",),
                   help="after training, fit one temperature on val by NLL (stored in best.ckpt, applied by"
                        " evaluate, predict and the Python API); report.json shows NLL and ECE before and after")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--val-fraction", type=float, help=f"held out when DATA has no val/ (default {d.val_fraction})")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: min(4, CPU count))")
    g.add_argument("--strict", action="store_true", help="stop on any unreadable image instead of leaving it out")
    g.add_argument("--augment", choices=("none", "light", "default", "heavy"),
                   help=f"train augmentation preset (default {d.augment})")
    g.add_argument("--aug", action="append", metavar="OP.PARAM=VALUE",
                   help="override one augmentation setting, e.g. --aug erasing.p=0.5 --aug noise=off")
    g.add_argument("--mixup", type=float, help="Mixup alpha; 0 turns it off (default 0)")
    g.add_argument("--cutmix", type=float, help="CutMix alpha; 0 turns it off (default 0)")
    g.add_argument("--mixup-prob", type=float, help=f"probability that a batch is mixed (default {d.mixup_prob})")
    g.add_argument("--mixup-switch-prob", type=float,
                   help=f"with both on, probability of CutMix over Mixup (default {d.mixup_switch_prob})")
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"),
                   help=f"one draw per batch, per pair or per element (default {d.mixup_mode})")
    g.add_argument("--mixup-off-epoch", type=int,
                   help="the epoch (0-based) at which mixing stops, as in timm; 0: never (default 0)")
    # The spellings of the first release, kept for one more (see settings.DEPRECATED).
    g.add_argument("--mix-prob", type=float, help=S)
    g.add_argument("--mix-switch-prob", type=float, help=S)
    g.add_argument("--mix-mode", choices=("batch", "pair", "elem"), help=S)
    g.add_argument("--mix-off-epoch", type=int, help=S)
    g.add_argument("--cache-views", type=int,
                   help="freeze and lp-ft's probe: frozen features are computed once for K views per"
                        " image, the clean eval view plus K-1 augmented draws; 0 runs the frozen backbone"
                        " every epoch (default 1)")
    g.add_argument("--decode-cache", choices=("auto", "off", "memory", "disk"),
                   help="keep each image decoded (shorter side 1.15x the input size, uint8) after its first"
                        " read, in memory or memory-mapped under RUN_DIR/cache; later epochs crop from it."
                        " auto: on when the backbone trains, in memory when it fits (default auto)")
    g = p.add_argument_group("weight averaging and snapshot ensembles (see `transferkit evaluate --ensemble`)")
    g.add_argument("--ema", action="store_true",
                   help="keep an exponential moving average of the weights; validated as val_acc_ema")
    g.add_argument("--ema-decay", type=float, help=f"EMA decay, reached after a warmup (default {d.ema_decay})")
    g.add_argument("--swa", action="store_true",
                   help="stochastic weight averaging over the last quarter of epochs (or the snapshot"
                        " cycle ends), written to checkpoints/swa.ckpt")
    g.add_argument("--snapshots", type=int, metavar="M",
                   help="M cosine cycles of epochs // M epochs (the last takes the rest), a checkpoint"
                        " snapshot-i.ckpt at the end of each; patience counts cycles (default 0: off)")
    g = p.add_argument_group("devices (passed to Lightning)")
    g.add_argument("--accelerator", help=f"cpu, gpu, auto ... (default {d.accelerator})")
    g.add_argument("--devices", help=f"number of devices or 'auto' (default {d.devices})")
    g.add_argument("--num-nodes", type=int, help=f"machines (default {d.num_nodes})")
    g.add_argument("--precision", help=f"32-true, 16-mixed, bf16-mixed ... (default {d.precision})")
    g.add_argument("--sync-bn", action="store_true",
                   help="several processes: BatchNorm layers that train use batch statistics of all of them"
                        " (SyncBatchNorm); frozen ones stay frozen")
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format for the network and batches (faster convolutions on GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the network; where compiling fails the run says so and trains eagerly")
    g = p.add_argument_group("experiment tracking (beside RUN_DIR/metrics.csv; pip install 'transferkit[track]')")
    g.add_argument("--logger", help="Lightning loggers, comma-separated: csv (RUN_DIR/logs/csv), tensorboard"
                                    " (RUN_DIR/logs/tensorboard), mlflow (a file store in RUN_DIR/mlruns)")
    g.add_argument("--mlflow-uri", help="mlflow's tracking URI instead of RUN_DIR/mlruns, e.g. sqlite:///mlflow.db"
                                        " or http://host:5000")


def _fit_config(args: argparse.Namespace):
    """The flags (over a --config file's settings), checked by the settings table before anything
    heavy is imported."""
    from transferkit.pipelines.settings import DEPRECATED, FitConfig, default_out

    given = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    base = {}
    if args.config:
        base = FitConfig.build(FitConfig.read(args.config), source=str(args.config)).to_dict()
        # A replay is a new run: never the old directory, never permission to overwrite it.
        base.pop("out", None)
        base.pop("overwrite", None)
        for old, (new, _) in DEPRECATED.items():
            if old in given:  # an old flag over a config file: it replaces the file's new key
                base.pop(new, None)
    merged = {**base, **given}
    if not merged.get("data"):
        raise UserError("fit needs DATA, the image folder (or --config FILE of a run, or --resume RUN_DIR)")
    # Absolute paths, so that config.yaml replays, resumes and evaluates from any directory.
    for key in ("data", "weights"):
        if merged.get(key):
            merged[key] = str(Path(merged[key]).expanduser().absolute())
    if merged.get("backbone_plugin"):  # one file per --backbone candidate, comma-separated
        merged["backbone_plugin"] = ",".join(str(Path(p).expanduser().absolute())
                                             for p in merged["backbone_plugin"].split(","))
    if not merged.get("out"):
        merged["out"] = default_out(merged.get("backbone", FitConfig.backbone))
    return FitConfig.build(merged, source="cli")


def _cmd_fit(args) -> int:
    if args.resume:
        extra = sorted(k for k in vars(args) if k not in _NOT_SETTINGS)
        if extra or args.config:
            raise UserError(f"--resume continues a run with its saved settings; drop {', '.join(extra) or '--config'}")
        quiet_lightning(args.verbose)
        from transferkit.pipelines.train.recipe import resume
        from transferkit.pipelines.train.timings import process_started

        report = resume(args.resume, progress=progress(), started=process_started())
        out = args.resume
    else:
        cfg = _fit_config(args)
        if args.print_config:  # checked like a fit, nothing written
            print(cfg.to_yaml(), end="")
            return 0
        quiet_lightning(args.verbose)
        from transferkit.pipelines.advise import fit_best
        from transferkit.pipelines.train.recipe import fit
        from transferkit.pipelines.train.timings import process_started

        report = (fit_best(cfg, progress=progress()) if "," in cfg.backbone
                  else fit(cfg, progress=progress(), started=process_started()))
        out = cfg.out
    if report is None:
        return 0
    ft = report["finetune"]
    print(f"fine-tuning: {ft['strategy']} ({ft['reason']})")
    print(f"val accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}"
          f"  after {report['epochs_trained']} epochs, {report['train_seconds']:.0f} s")
    if report.get("timings"):
        from transferkit.pipelines.train.timings import describe

        print(describe(report["timings"]))
    print(f"run directory: {out}   (open {Path(out) / 'report.html'} in a browser)")
    return 0


def _cmd_lr_find(args) -> int:
    if getattr(args, "lr", "find") != "find" or args.resume:
        raise UserError("lr-find sweeps the rate itself; drop --lr" + (" and --resume" if args.resume else ""))
    args.lr = "find"
    if not getattr(args, "out", None):
        from transferkit.pipelines.settings import FitConfig, default_out

        args.out = default_out("lr-find-" + getattr(args, "backbone", FitConfig.backbone))
    cfg = _fit_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    quiet_lightning(args.verbose)
    from transferkit.pipelines.train.recipe import fit

    found = fit(cfg, progress=progress(), find_only=True)
    if found is None:
        return 0
    lr = found["lr_find"]["suggestion"]
    print(f"suggested head learning rate: {lr:.3g} ({found['finetune']['strategy']}, {cfg.optimizer})")
    print(f"curve: {Path(cfg.out) / 'plots' / 'lr_find.png'}; train with it: transferkit fit --config"
          f" {Path(cfg.out) / 'config.yaml'} --lr {lr:.3g}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune and evaluate on built-in procedural data, offline",
                       formatter_class=_Formatter)
    p.add_argument("--out", default="runs/demo", help="folder for the demo data and runs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    quiet_lightning(args.verbose)
    from transferkit.pipelines.demo import run_demo

    res = run_demo(Path(args.out), seed=args.seed, progress=progress())
    ft, sc = res["finetune"], res["scratch"]
    print()
    print("transferkit demo: 4 target classes, few images each, backbone pretrained on 8 other shapes")
    print(f"  fine-tuned from pretrained weights ({ft['finetune']['strategy']}): val accuracy {ft['accuracy']:.3f}")
    print(f"  same run from random weights (full):          val accuracy {sc['accuracy']:.3f}")
    print(f"  runs: {', '.join(res['runs'].values())}")
    print(f"  report: {res['runs']['finetune']}/report.html (open it in a browser)   predictions: {res['predictions']}")
    return 0
