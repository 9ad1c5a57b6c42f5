"""`transferkit augment preview` and `transferkit augment text`."""
from __future__ import annotations

import json

from transferkit.cli.common import Formatter


def add_augment(sub) -> None:
    p = sub.add_parser("augment", help="see image augmentation, or expand a text dataset",
                       formatter_class=Formatter)
    cmds = p.add_subparsers(dest="augment_command", required=True, parser_class=type(p))

    v = cmds.add_parser("preview", help="write a grid of augmented draws of some images", formatter_class=Formatter,
                        description="Each source image (a row) with several augmented draws; with --mixup or"
                                    " --cutmix, a row of mixed pairs with their label weights written on them.")
    v.add_argument("paths", nargs="+", help="image files or folders")
    v.add_argument("--preset", default="default", choices=("light", "default", "heavy"))
    v.add_argument("--aug", action="append", default=[], metavar="OP.PARAM=VALUE", help="override one setting")
    v.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha")
    v.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha")
    v.add_argument("--size", type=int, default=224, help="output size of each draw")
    v.add_argument("--draws", type=int, default=6, help="augmented draws per image")
    v.add_argument("--max-images", type=int, default=8, help="source images shown at most")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("-o", "--out", default="augment-preview.png", help="PNG to write")
    v.set_defaults(func=_cmd_preview)

    t = cmds.add_parser("text", help="expand a CSV/TSV text dataset with augmented rows", formatter_class=Formatter,
                        description="Keeps every original row and its label and adds N augmented rows after each,"
                                    " with columns aug_op (the op, or 'original') and source_row.")
    t.add_argument("input", help="CSV or TSV file with a header row")
    t.add_argument("--column", default="text", help="the text column")
    t.add_argument("--label-column", default=None, help="label column (kept and counted)")
    t.add_argument("--ops", default="swap,delete",
                   help="comma-separated: swap, delete, crop, synonym, insert, backtranslate")
    t.add_argument("--n", type=int, default=1, help="augmented rows per original")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--aug-p", type=float, default=None, help="fraction of words an op touches")
    t.add_argument("--synonyms", default=None, help="synonym file (one group per line); default WordNet")
    t.add_argument("--lang", default=None, help="WordNet language (default eng)")
    t.add_argument("--pivot", default=None, help="back-translation pivot language (default de)")
    t.add_argument("--forward-model", default=None, help="MarianMT name or folder, source -> pivot")
    t.add_argument("--backward-model", default=None, help="MarianMT name or folder, pivot -> source")
    t.add_argument("--cache", default=None, help="back-translation cache file (sqlite)")
    t.add_argument("--batch-size", type=int, default=None, help="back-translation batch size")
    t.add_argument("--num-beams", type=int, default=None)
    t.add_argument("--sampling", action="store_true", default=None, help="sample translations instead of beams")
    t.add_argument("--max-length", type=int, default=None)
    t.add_argument("--device", default=None, help="cpu, cuda, ... for back-translation")
    t.add_argument("-o", "--out", required=True, help="CSV or TSV to write")
    t.set_defaults(func=_cmd_text)


def _cmd_preview(args) -> int:
    from pathlib import Path

    from transferkit.augment.image import parse_overrides
    from transferkit.pipelines.preview import preview_grid

    out = preview_grid([Path(p) for p in args.paths], Path(args.out), preset=args.preset, size=args.size,
                       mixup=args.mixup, cutmix=args.cutmix, draws=args.draws, seed=args.seed,
                       overrides=parse_overrides(args.aug), max_images=args.max_images)
    print(f"preview written to {out}")
    return 0


def _cmd_text(args) -> int:
    from transferkit.pipelines.text_dataset import augment_csv

    summary = augment_csv(args.input, args.out, column=args.column, label_column=args.label_column,
                          ops=args.ops, n=args.n, seed=args.seed, aug_p=args.aug_p, synonyms=args.synonyms,
                          lang=args.lang, pivot=args.pivot, forward_model=args.forward_model,
                          backward_model=args.backward_model, cache_path=args.cache,
                          batch_size=args.batch_size, num_beams=args.num_beams, sampling=args.sampling,
                          max_length=args.max_length, device=args.device)
    print(json.dumps(summary, indent=2))
    return 0
