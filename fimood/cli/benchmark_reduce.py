"""fimood benchmark-reduce: the fit reduce's peak driver memory over many rows of synthetic features."""

from __future__ import annotations

import argparse

HELP = "peak driver memory of the fit reduce over many rows (synthetic features, no model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=228, help="per row (228: the study's Glow)")
    parser.add_argument("--max-calibration-rows", type=int, default=100_000, help="as `fimood fit`'s")
    parser.add_argument("--calibration-fraction", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per batch, as the fit pass feeds them")


def run(args: argparse.Namespace) -> int:
    import platform

    from fimood.research.benchmark import run_reduce_benchmark

    result = run_reduce_benchmark(
        args.rows, args.features, args.max_calibration_rows, args.calibration_fraction, args.batch_size
    )
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    print(result)
    return 0
