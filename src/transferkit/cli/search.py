"""`transferkit search`."""
from __future__ import annotations

import argparse

from transferkit.cli.common import Formatter, progress, quiet_lightning
from transferkit.errors import UserError


def add_search(sub) -> None:
    from transferkit.cli.fit import _fit_options

    p = sub.add_parser(
        "search", help="random hyperparameter search, coarse to fine, on Optuna (each trial a fit)",
        formatter_class=Formatter, argument_default=argparse.SUPPRESS,
        description="Draws the learning rate and weight decay (log-uniform), label smoothing, dropout, the"
                    " augmentation preset and, with --strategies, the strategy; a coarse round over the full ranges,"
                    " then a fine round around the best quarter; unpromising trials stop early (successive"
                    " halving). The other flags are fit's and hold for every trial. Writes OUT/trials.csv,"
                    " OUT/search.png and OUT/best-config.yaml (replay it with `transferkit fit --config`). Processes"
                    " that share --storage work on one study. Needs `pip install 'transferkit[search]'`.",
        epilog="example: transferkit search DATA --finetune freeze --trials 30 --out runs/search")
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=int, default=30, help="trials this process runs (default 30)")
    g.add_argument("--budget-minutes", type=float, default=None, help="stop starting trials after this long")
    g.add_argument("--storage", default=None,
                   help="Optuna storage shared by several processes, e.g. sqlite:///study.db or a database URL"
                        " (default: OUT/study.db)")
    g.add_argument("--study-name", default="transferkit", help="the study within the storage")
    g.add_argument("--strategies", default=None, help="also search the strategy among these, e.g. freeze,partial")
    _fit_options(p)
    p.set_defaults(func=_cmd_search)


def _cmd_search(args) -> int:
    from pathlib import Path

    from transferkit.cli.fit import _fit_config

    if args.resume:
        raise UserError("search starts its own trials; drop --resume")
    opts = {k: vars(args).pop(k) for k in ("trials", "budget_minutes", "storage", "study_name", "strategies")}
    if not getattr(args, "out", None):
        from transferkit.pipelines.settings import FitConfig, default_out

        args.out = default_out("search-" + getattr(args, "backbone", FitConfig.backbone))
    base = _fit_config(args)
    quiet_lightning(args.verbose)
    try:  # our own line per trial says what Optuna's would
        import optuna

        optuna.logging.set_verbosity(optuna.logging.DEBUG if args.verbose else optuna.logging.WARNING)
    except ImportError:
        pass
    from transferkit.pipelines.search import search

    strategies = tuple(s.strip() for s in opts["strategies"].split(",")) if opts["strategies"] else ()
    res = search(base, base.out, trials=opts["trials"], budget_minutes=opts["budget_minutes"],
                 storage=opts["storage"], study_name=opts["study_name"], strategies=strategies, seed=base.seed,
                 progress=progress())
    print(f"{res['complete']} trial(s) finished, {res['pruned']} pruned ({res['trials']} in the study);"
          f" best val accuracy {res['best_accuracy']:.4f} (trial {res['best_trial']}): {res['best_params']}")
    print(f"replay it: transferkit fit --config {res['best_config']}   (all trials: {Path(base.out) / 'trials.csv'})")
    return 0
