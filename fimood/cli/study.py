"""fimood study: every scoring rule × registered model × OOD set × batch size, and its report."""

from __future__ import annotations

import argparse
import sys
import time

from fimood.models import MODELS

HELP = "train the registered models on FashionMNIST and compare every scoring rule and baseline on every OOD set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work", default="study-out", help="data and checkpoints (reused when they were made the same way)"
    )
    parser.add_argument("--out", default="docs", help="where the report, its JSON and the plots go")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--preset", default="small", help="a preset every chosen model has")
    parser.add_argument("--train-steps", type=int, default=None, help="default: each model's own study length")
    parser.add_argument("--rows", type=int, default=2000, help="rows of the held-out set and of each OOD set")
    parser.add_argument("--fit-rows", type=int, default=5000, help="in-distribution rows the detectors fit on")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[1, 5])
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the training of models trained here and the made-up OOD sets"
    )
    parser.add_argument("--command-line", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from fimood.cli.options import check_preset
    from fimood.research.study import StudyConfig, run_study
    from fimood.research.study_report import write_report

    models = tuple(dict.fromkeys(args.models))
    for model in models:
        check_preset(model, args.preset)
    config = StudyConfig(
        work=args.work,
        models=models,
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
    return 0
