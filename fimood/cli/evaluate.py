"""fimood evaluate: the gradient method against Typicality and likelihood, per row and in groups."""

from __future__ import annotations

import argparse

from fimood.cli.options import add_allow_import, named_url

HELP = "compare the gradient method, Typicality and likelihood on held-out in-distribution rows vs OOD sets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", required=True)
    parser.add_argument("--id-data", required=True, help="held-out in-distribution table (not the fit rows)")
    parser.add_argument("--ood-data", type=named_url, nargs="+", required=True, metavar="NAME=URL")
    parser.add_argument(
        "--group-sizes",
        type=int,
        nargs="+",
        default=[1],
        help="batch sizes to evaluate; >1 is the paper's grouped variant, fitted on the fit rows",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each table")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    add_allow_import(parser)


def run(args: argparse.Namespace) -> int:
    from fimood.evaluation import evaluate, format_table, write_json

    rows = evaluate(
        args.detector,
        args.id_data,
        dict(args.ood_data),
        group_sizes=tuple(args.group_sizes),
        limit=args.limit,
        allowed_imports=tuple(args.allow_import),
        storage_options=args.storage_options,
    )
    print(format_table(rows))
    if args.out:
        write_json(rows, args.out, storage_options=args.storage_options)
    return 0
