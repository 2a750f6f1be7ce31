"""fimood benchmark-pipeline: rows/s of the Ray passes beside the in-process engine, and of many partitions."""

from __future__ import annotations

import argparse

HELP = "rows/s of the Ray passes vs the in-process engine, and of scoring many partitions vs one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "paper"], help="of Glow")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=40, help="folders the scored rows are split into")
    parser.add_argument("--repeats", type=int, default=3, help="score runs per layout (medians are printed)")


def run(args: argparse.Namespace) -> int:
    import statistics
    import tempfile

    import torch

    from fimood.research.benchmark import machine_name, run_pipeline_benchmark

    with tempfile.TemporaryDirectory() as workdir:
        rows = run_pipeline_benchmark(
            args.rows,
            args.preset,
            args.batch_size,
            args.num_actors,
            args.cpus_per_actor,
            args.partitions,
            args.repeats,
            workdir,
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine_name(device)}, Ray actors: {args.num_actors} x {args.cpus_per_actor} CPU")
    modes = dict.fromkeys(row.mode for row in rows)
    rate = {mode: statistics.median(r.rows_per_second for r in rows if r.mode == mode) for mode in modes}
    for row in rows:
        gpu = f"{row.gpu_utilization:>6.0f}% GPU" if row.gpu_utilization is not None else ""
        print(
            f"{row.mode:<24}{row.rows:>7} rows{row.seconds:>9.1f} s{row.rows_per_second:>9.1f} rows/s"
            f"{row.rows_per_second / rate['in-process']:>7.2f}x in-process{gpu}"
        )
    one, many = rate["score, 1 partition"], rate[f"score, {args.partitions} partitions"]
    print(f"fit (warm) vs in-process: {rate['fit (warm)'] / rate['in-process']:.2f}x")
    print(f"score, {args.partitions} partitions vs 1 partition (medians): {many / one:.2f}x")
    return 0
