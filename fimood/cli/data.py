"""fimood data: write a bundled demo data set as Parquet shards."""

from __future__ import annotations

import argparse

HELP = "write a bundled demo data set as Parquet shards (id, image PNG, label)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fimood.onboarding.datasets import SOURCES

    parser.add_argument("source", choices=SOURCES)
    parser.add_argument("--out", required=True, help="output folder URL")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N rows")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)


def run(args: argparse.Namespace) -> int:
    from fimood.lake.tables import write_image_parquet
    from fimood.onboarding.datasets import load_source

    source = load_source(args.source, args.split, args.limit)
    shards = write_image_parquet(
        args.out,
        source.ids,
        source.images,
        source.labels,
        rows_per_shard=args.rows_per_shard,
        storage_options=args.storage_options,
    )
    print(f"wrote {len(source.ids)} rows of {args.source}/{args.split} in {len(shards)} shards to {args.out}")
    return 0
