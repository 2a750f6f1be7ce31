"""fimood monitor-study: the monitor's false alarms and power, against the likelihood, Typicality and pixel tests."""

from __future__ import annotations

import argparse
import sys
import time

from fimood.models import MODELS

HELP = "measure the monitor's false alarms and its power against MNIST mixed into FashionMNIST nights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="study-out", help="the detection study's data and checkpoints")
    parser.add_argument("--out", default="docs", help="where monitoring-study.md and its JSON go")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--null-nights", type=int, default=1000, help="shift-free nights per model and size")
    parser.add_argument("--power-nights", type=int, default=100, help="nights per model, size and MNIST share")
    parser.add_argument("--night-rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--alpha", type=float, default=0.01, help="per-night false-alarm level of every method")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from fimood.apps.monitor_study import MonitorStudyConfig, run_monitor_study, write_monitor_study

    config = MonitorStudyConfig(
        work=args.work,
        models=tuple(dict.fromkeys(args.models)),
        night_rows=tuple(args.night_rows),
        null_nights=args.null_nights,
        power_nights=args.power_nights,
        alpha=args.alpha,
        seed=args.seed,
    )
    start = time.perf_counter()
    result = run_monitor_study(config)
    path = write_monitor_study(result, args.out, "fimood " + " ".join(sys.argv[1:]), time.perf_counter() - start)
    print(f"wrote {path}")
    return 0
