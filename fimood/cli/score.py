"""fimood score: write per-row OOD scores into the score table, each input folder its own partition."""

from __future__ import annotations

import argparse
import sys

from fimood.cli.options import add_pipeline_options, pipeline_config

HELP = "write per-row OOD scores into a Delta table, each input folder one partition committed whole (Ray pipeline)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", required=True, help="detector folder URL")
    parser.add_argument("--data", required=True, help="rows to score: a Parquet file or folder (any layout)")
    parser.add_argument(
        "--out", required=True, help="the score table's URL, a Delta table (not inside the data, nor containing it)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip partitions committed by this detector from the same input shards"
    )
    parser.add_argument(
        "--partitions",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="score only these input folders (and those below them), one glob segment per folder level, "
        "e.g. 'date=2026-11-26', 'date=2026-11-*' or '*/hour=0?'",
    )
    parser.add_argument("--features", action="store_true", help="also write per-layer z-scores")
    add_pipeline_options(parser)


def run(args: argparse.Namespace) -> int:
    from fimood import passes

    try:
        summary = passes.score(
            args.detector,
            args.data,
            args.out,
            pipeline_config(args),
            resume=args.resume,
            z_scores=args.features,
            partitions=args.partitions,
        )
    except passes.ScoringFailed as failure:
        print(f"score: {failure.summary}; written to {args.out}")
        print(f"fimood score: {failure}", file=sys.stderr)
        return 1
    print(f"score: {summary}; written to {args.out}")
    return 0
