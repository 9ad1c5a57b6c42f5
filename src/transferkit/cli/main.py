"""`transferkit` command line: parse arguments into configs, call pipelines, print results.

Each command lives in its own module here; this one builds the parser and turns user errors
into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from transferkit.cli import advise, augment, evaluate, export, fit, search
from transferkit.cli.common import Formatter
from transferkit.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line and exit 2, like ours
        self.exit(2, f"transferkit: error: {message} (see `{self.prog} --help`)\n")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("transferkit: %(message)s"))
    root = logging.getLogger("transferkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def build_parser() -> argparse.ArgumentParser:
    from transferkit import __version__

    parser = _Parser(prog="transferkit", description="Transfer learning on image folders.",
                     formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fit.add_fit(sub)
    fit.add_lr_find(sub)
    search.add_search(sub)
    evaluate.add_evaluate(sub)
    evaluate.add_predict(sub)
    export.add_export(sub)
    fit.add_demo(sub)
    augment.add_augment(sub)
    advise.add_advise(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except UserError as exc:
        print(f"transferkit: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
