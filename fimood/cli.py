"""The `fimood` command: data, train, fit, score, evaluate, demo, benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from fimood.engine import METHODS
from fimood.scoring import DEFAULT_RULE, SCORING_RULES


def _storage_options(text: str | None) -> dict | None:
    if text is None:
        return None
    options = json.loads(text)
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"--storage-options must be a JSON object, got {text!r}")
    return options


def _named_url(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"expected NAME=URL, got {text!r}")
    return name, url


def cmd_data(args: argparse.Namespace) -> None:
    from fimood.data import load_source
    from fimood.io import write_image_parquet

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


def cmd_train(args: argparse.Namespace) -> None:
    from fimood.train import TrainConfig, steps_for_epochs
    from fimood.workflow import train_checkpoint

    steps = args.steps
    if args.epochs is not None:
        from fimood.io import read_parquet_table

        n_rows = read_parquet_table(args.data, args.storage_options).num_rows
        steps = steps_for_epochs(args.epochs, n_rows, args.batch_size)
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


def _pipeline_config(args: argparse.Namespace):
    from fimood.pipeline import PipelineConfig

    return PipelineConfig(
        input_format=args.input_format,
        image_column=args.image_column,
        id_column=args.id_column,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
        method=args.method,
        address=args.address,
        allowed_imports=tuple(args.allow_import),
        storage_options=args.storage_options,
    )


def cmd_fit(args: argparse.Namespace) -> None:
    from fimood import pipeline
    from fimood.detector import DetectorSettings

    settings = DetectorSettings(
        method=args.method,
        rule=args.rule,
        batch_size=args.batch_size,
        false_positive_rate=args.fpr,
        calibration_fraction=args.calibration_fraction,
    )
    detector, summary = pipeline.fit(
        args.model, args.data, _pipeline_config(args), settings, max_calibration_rows=args.max_calibration_rows
    )
    detector_id = detector.save(args.out, args.storage_options)
    per_row = detector.by_group[1]
    print(f"fit: {summary}")
    print(
        f"detector {detector_id}: {per_row.stats_.count} fit rows, {len(per_row.calibration_scores_)} calibration "
        f"rows, {int(per_row.rule_.kept_features_.sum())}/{len(detector.feature_names)} features kept, "
        f"threshold {per_row.threshold_:.2f}; saved to {args.out}"
    )


def cmd_score(args: argparse.Namespace) -> None:
    from fimood import pipeline

    summary = pipeline.score(
        args.detector, args.data, args.out, _pipeline_config(args), resume=args.resume, z_scores=args.features
    )
    print(f"score: {summary}; written to {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from fimood.evaluate import evaluate, format_table, write_json

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


def cmd_study(args: argparse.Namespace) -> None:
    import time

    from fimood.study import StudyConfig, run_study
    from fimood.study_report import write_report

    config = StudyConfig(
        work=args.work,
        models=tuple(args.models),
        preset=args.preset,
        train_steps=args.train_steps,
        rows=args.rows,
        fit_rows=args.fit_rows,
        group_sizes=tuple(args.group_sizes),
        seed=args.seed,
    )
    start = time.perf_counter()
    result = run_study(config)
    command = "fimood " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    rule = write_report(result, config, args.out, command, time.perf_counter() - start)
    print(f"wrote {args.out}/detection-study.md; the default-rule criterion picks {rule!r}")


def cmd_demo(args: argparse.Namespace) -> None:
    from fimood.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(out=args.out, preset=args.preset, train_steps=args.train_steps, method=args.method))
    print(result.report())
    print(f"\nscored MNIST through the pipeline: {result.score}; score table under {args.out}/scores/mnist")


def cmd_benchmark(args: argparse.Namespace) -> None:
    import torch

    from fimood.benchmark import format_rows, machine_name, run_benchmark

    rows = run_benchmark(
        args.presets, args.methods, args.batch_size, args.loop_batch_size, args.repeats, args.device, args.model
    )
    print(format_rows(rows, machine_name(torch.device(args.device))))


def cmd_benchmark_pipeline(args: argparse.Namespace) -> None:
    import tempfile

    import torch

    from fimood.benchmark import machine_name, run_pipeline_benchmark

    with tempfile.TemporaryDirectory() as workdir:
        rows = run_pipeline_benchmark(
            args.rows, args.preset, args.batch_size, args.num_actors, args.cpus_per_actor, workdir
        )
    print(f"machine: {machine_name(torch.device('cpu'))}, Ray actors: {args.num_actors} x {args.cpus_per_actor} CPU")
    in_process = rows[0].rows_per_second
    for row in rows:
        print(
            f"{row.mode:<18}{row.rows:>7} rows{row.seconds:>9.1f} s{row.rows_per_second:>9.1f} rows/s"
            f"{row.rows_per_second / in_process:>7.2f}x in-process"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fimood",
        description=(
            "Out-of-distribution scoring with layer-wise gradient norms of deep generative models. "
            "URLs may be local paths or any fsspec URL (s3://, gs://, memory://, ...)."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, fn) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(fn=fn)
        sub.add_argument(
            "--storage-options",
            type=_storage_options,
            default=None,
            help="JSON object passed to fsspec (credentials, endpoint); never logged",
        )
        return sub

    data = command("data", "write a bundled demo data set as Parquet shards (id, image PNG, label)", cmd_data)
    data.add_argument("source", choices=["fashion-mnist", "mnist", "digits"])
    data.add_argument("--out", required=True, help="output folder URL")
    data.add_argument("--split", default="test", choices=["train", "test"])
    data.add_argument("--limit", type=int, default=None, help="keep only the first N rows")
    data.add_argument("--rows-per-shard", type=int, default=10_000)

    train = command("train", "train a built-in likelihood model on a Parquet image table", cmd_train)
    train.add_argument("--model", default="glow", choices=["glow", "vae", "ddpm"], help="ddpm needs fimood[diffusion]")
    train.add_argument("--data", required=True, help="training table URL")
    train.add_argument("--out", required=True, help="checkpoint folder URL")
    train.add_argument("--preset", default="small", choices=["tiny", "small", "paper"], help="paper: Glow only")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=1500)
    length.add_argument("--epochs", type=float, default=None)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--test-data", default=None, help="table to report test bits/dim on")

    def allow_import(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--allow-import",
            nargs="+",
            default=[],
            metavar="PACKAGE",
            help="packages a checkpoint may name its model class from (your own model; docs/own-model.md)",
        )

    def pipeline_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
        sub.add_argument(
            "--num-actors",
            type=int,
            default=1,
            help="model replicas in the actor pool (one GPU each when the cluster has GPUs)",
        )
        sub.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs (and torch threads) per replica")
        sub.add_argument("--batch-size", type=int, default=64, help="rows per gradient batch")
        sub.add_argument("--method", default="auto", choices=METHODS, help="gradient engine")
        sub.add_argument(
            "--input-format",
            default="parquet",
            choices=["parquet", "images"],
            help="Parquet shards, or folders of PNG/JPEG files (id = path)",
        )
        sub.add_argument("--image-column", default="image", help="column of encoded images or uint8 arrays")
        sub.add_argument("--id-column", default="id", help="row id column; when absent, ids are `<file>#<row>`")
        allow_import(sub)

    fit = command(
        "fit", "fit the detector on in-distribution rows the model was not trained on (Ray pipeline)", cmd_fit
    )
    fit.add_argument("--model", required=True, help="checkpoint folder URL")
    fit.add_argument(
        "--data", required=True, help="in-distribution rows: a Parquet file or folder, Hive partitions kept"
    )
    fit.add_argument("--out", required=True, help="detector folder URL")
    fit.add_argument("--fpr", type=float, default=0.05, help="false-positive rate that sets the threshold")
    fit.add_argument(
        "--rule", default=DEFAULT_RULE, choices=sorted(SCORING_RULES), help="scoring rule (docs/scoring-rules.md)"
    )
    fit.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.2,
        help="share of rows (by a hash of the id) held out to calibrate",
    )
    fit.add_argument(
        "--max-calibration-rows", type=int, default=100_000, help="bound on calibration rows kept on the driver"
    )
    pipeline_options(fit)

    score = command("score", "write per-row OOD scores, partitioned like the input (Ray pipeline)", cmd_score)
    score.add_argument("--detector", required=True, help="detector folder URL")
    score.add_argument("--data", required=True, help="rows to score")
    score.add_argument("--out", required=True, help="output folder URL")
    score.add_argument("--resume", action="store_true", help="skip partitions already committed by this detector")
    score.add_argument("--features", action="store_true", help="also write per-layer z-scores")
    pipeline_options(score)

    evaluate = command("evaluate", "compare the gradient method, Typicality and likelihood", cmd_evaluate)
    evaluate.add_argument("--detector", required=True)
    evaluate.add_argument("--id-data", required=True, help="held-out in-distribution table (not the fit rows)")
    evaluate.add_argument("--ood-data", type=_named_url, nargs="+", required=True, metavar="NAME=URL")
    evaluate.add_argument(
        "--group-sizes",
        type=int,
        nargs="+",
        default=[1],
        help="batch sizes to evaluate; >1 is the paper's grouped variant, fitted on the fit rows",
    )
    evaluate.add_argument("--limit", type=int, default=None, help="first N rows of each table")
    evaluate.add_argument("--out", default=None, help="write the table as JSON here")
    allow_import(evaluate)

    study = command(
        "study",
        "train Glow, VAE and DDPM on FashionMNIST and compare every scoring rule and baseline on every OOD set",
        cmd_study,
    )
    study.add_argument("--work", default="study-out", help="data and checkpoints (checkpoints found here are reused)")
    study.add_argument("--out", default="docs", help="where the report, its JSON and the plot go")
    study.add_argument("--models", nargs="+", default=["glow", "vae", "ddpm"], choices=["glow", "vae", "ddpm"])
    study.add_argument("--preset", default="small", choices=["tiny", "small"])
    study.add_argument("--train-steps", type=int, default=None, help="default: 3750 (Glow), 1500 (VAE), 1200 (DDPM)")
    study.add_argument("--rows", type=int, default=2000, help="rows of the held-out set and of each OOD set")
    study.add_argument("--fit-rows", type=int, default=5000, help="in-distribution rows the detectors fit on")
    study.add_argument("--group-sizes", type=int, nargs="+", default=[1, 5])
    study.add_argument(
        "--seed", type=int, default=0, help="seeds the training of models trained here and the made-up OOD sets"
    )
    study.add_argument("--command-line", default=None, help=argparse.SUPPRESS)

    demo = command("demo", "build demo data, train Glow on FashionMNIST, fit, evaluate vs MNIST and digits", cmd_demo)
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--preset", default="small", choices=["tiny", "small"])
    demo.add_argument("--train-steps", type=int, default=1500)
    demo.add_argument("--method", default="auto", choices=METHODS)

    bench = command("benchmark", "images/s of the gradient engines vs a plain forward+backward", cmd_benchmark)
    bench.add_argument("--model", default="glow", choices=["glow", "vae", "ddpm"])
    bench.add_argument(
        "--presets", nargs="+", default=["small", "paper"], choices=["tiny", "small", "paper"], help="paper: Glow only"
    )
    bench.add_argument("--methods", nargs="+", default=["loop", "vmap", "hooks"], choices=["loop", "vmap", "hooks"])
    bench.add_argument("--batch-size", type=int, default=64)
    bench.add_argument("--loop-batch-size", type=int, default=8, help="rows for `loop` (its cost is linear)")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--device", default="cpu")
    bench_pipeline = command(
        "benchmark-pipeline", "rows/s of the Ray fit pass vs the in-process engine", cmd_benchmark_pipeline
    )
    bench_pipeline.add_argument("--rows", type=int, default=2048)
    bench_pipeline.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    bench_pipeline.add_argument("--batch-size", type=int, default=64)
    bench_pipeline.add_argument("--num-actors", type=int, default=1)
    bench_pipeline.add_argument("--cpus-per-actor", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
