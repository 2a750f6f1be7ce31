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
    parser.add_argument(
        "--id-hash-range",
        nargs=2,
        type=float,
        default=(0.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="train only on the rows whose id hash is in [LOW, HIGH), so the others stay unseen (e.g. 0 0.75)",
    )


def run(args: argparse.Namespace) -> int:
    from fimood.lake.tables import read_parquet_table
    from fimood.method.splits import check_id_hash_range, training_rows
    from fimood.models.training import TrainConfig, steps_for_epochs
    from fimood.onboarding.training import train_checkpoint

    check_preset(args.model, args.preset)
    id_hash_range = check_id_hash_range(args.id_hash_range)
    steps = args.steps
    if args.epochs is not None:
        ids = [str(i) for i in read_parquet_table(args.data, args.storage_options).column("id").to_pylist()]
        steps = steps_for_epochs(args.epochs, int(training_rows(ids, id_hash_range).sum()), args.batch_size)
    config = TrainConfig(steps=steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    summary = train_checkpoint(
        args.data,
        args.out,
        model_type=args.model,
        preset=args.preset,
        train_config=config,
        test_data_url=args.test_data,
        id_hash_range=id_hash_range,
        storage_options=args.storage_options,
    )
    test = f", test NLL {summary.test_nll:.3f} {summary.nll_unit}" if summary.test_nll is not None else ""
    print(
        f"trained {summary.steps} steps on {summary.rows} rows: final training loss {summary.final_loss:.3f}{test}; "
        f"saved to {args.out}"
    )
    return 0
