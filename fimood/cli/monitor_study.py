"""fimood monitor-study: the monitor's false alarms and power, one reference per deployment, against rival tests."""

from __future__ import annotations

import argparse
import sys
import time

from fimood.models import MODELS

HELP = "measure the monitor's false alarms (one reference per deployment, fresh nights) and its power against rivals"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="study-out", help="the study's data, checkpoints and feature cache")
    parser.add_argument("--out", default="docs", help="where monitoring-study.md and its JSON go")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--references", type=int, default=200, help="deployments: one reference each")
    parser.add_argument("--night-rows", type=int, nargs="+", default=[1000, 10000], help="rows of a night")
    parser.add_argument(
        "--nights", type=int, nargs="+", default=[10, 1], help="disjoint nights per reference, one count per size"
    )
    parser.add_argument("--alpha", type=float, default=0.01, help="per-night false-alarm level of every method")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from fimood.cli.options import UsageError
    from fimood.research.monitor_study import MonitorStudyConfig, run_monitor_study, write_monitor_study

    if len(args.nights) != len(args.night_rows):
        raise UsageError(f"--nights needs one count per --night-rows size, got {args.nights} for {args.night_rows}")
    config = MonitorStudyConfig(
        work=args.work,
        models=tuple(dict.fromkeys(args.models)),
        references=args.references,
        night_rows=tuple(args.night_rows),
        nights=tuple(args.nights),
        alpha=args.alpha,
        seed=args.seed,
    )
    start = time.perf_counter()
    result = run_monitor_study(config)
    path = write_monitor_study(result, args.out, "fimood " + " ".join(sys.argv[1:]), time.perf_counter() - start)
    print(f"wrote {path}")
    return 0
