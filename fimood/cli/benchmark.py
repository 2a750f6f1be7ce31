"""fimood benchmark: images/s of each gradient engine beside a plain forward+backward, same model and data."""

from __future__ import annotations

import argparse

from fimood.cli.options import add_model, check_preset

HELP = "images/s of the gradient engines vs a plain forward+backward"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("--presets", nargs="+", default=None, help="default: small and, for glow, paper")
    parser.add_argument("--methods", nargs="+", default=["loop", "vmap", "hooks"], choices=["loop", "vmap", "hooks"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loop-batch-size", type=int, default=8, help="rows for `loop` (its cost is linear)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from fimood.models import MODELS
    from fimood.research.benchmark import format_rows, machine_name, run_benchmark

    presets = args.presets or [p for p in ("small", "paper") if p in MODELS[args.model].presets]
    for preset in presets:
        check_preset(args.model, preset)
    rows = run_benchmark(
        presets, args.methods, args.batch_size, args.loop_batch_size, args.repeats, args.device, args.model
    )
    print(format_rows(rows, machine_name(torch.device(args.device))))
    return 0
