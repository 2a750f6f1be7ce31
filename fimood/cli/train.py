"""fimood train: train a registered model on a Parquet image table."""

from __future__ import annotations

import argparse

from fimood.cli.options import add_model, add_preset, check_preset

HELP = "train a registered likelihood model on a Parquet image table (its images' shape)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    add_preset(parser)
    parser.add_argument("--data", required=True, help="training table URL")
    parser.add_argument("--out", required=True, help="checkpoint folder URL")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=1500)
    length.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-data", default=None, help="table to report the test NLL on")


def run(args: argparse.Namespace) -> int:
    from fimood.apps.training import train_checkpoint
    from fimood.lake.tables import read_parquet_table
    from fimood.models.training import TrainConfig, steps_for_epochs

    check_preset(args.model, args.preset)
    steps = args.steps
    if args.epochs is not None:
        steps = steps_for_epochs(
            args.epochs, read_parquet_table(args.data, args.storage_options).num_rows, args.batch_size
        )
    config = TrainConfig(steps=steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    summary = train_checkpoint(
        args.data,
        args.out,
        model_type=args.model,
        preset=args.preset,
        train_config=config,
        test_data_url=args.test_data,
        storage_options=args.storage_options,
    )
    test = f", test NLL {summary.test_nll:.3f} {summary.nll_unit}" if summary.test_nll is not None else ""
    print(f"trained {summary.steps} steps: final training loss {summary.final_loss:.3f}{test}; saved to {args.out}")
    return 0
