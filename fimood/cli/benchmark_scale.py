"""fimood benchmark-scale: scoring many small partitions against one large one, on a loopback S3."""

from __future__ import annotations

import argparse

HELP = "the score pass over many small partitions vs one large one on loopback S3 (needs moto[server])"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=2_000, help="folders the many-partition layout has")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"], help="of Glow")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs per layout, alternated (medians are printed)")


def run(args: argparse.Namespace) -> int:
    import statistics
    import tempfile

    import torch

    from fimood.research.benchmark import machine_name
    from fimood.research.scale_benchmark import run_scale_benchmark

    with tempfile.TemporaryDirectory() as workdir:
        rows = run_scale_benchmark(args.rows, args.partitions, args.preset, args.batch_size, args.repeats, workdir)
    print(f"machine: {machine_name(torch.device('cpu'))}; Glow {args.preset}, 1 actor x 2 CPU, loopback S3 (moto)")
    for row in rows:
        print(row)
    rate = {
        count: statistics.median(r.rows_per_second for r in rows if r.partitions == count)
        for count in (1, args.partitions)
    }
    print(f"{args.partitions:,} partitions vs 1 partition (medians of rows/s): {rate[args.partitions] / rate[1]:.2f}x")
    return 0
