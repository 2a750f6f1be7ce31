"""fimood monitor: score what is new, test each partition for dataset shift, keep the history, write the report."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from fimood.cli.options import UsageError, add_pipeline_options, pipeline_config
from fimood.lake.delta import ConcurrentWriters
from fimood.storage import StorageUnavailable

HELP = "nightly dataset-shift monitoring: per-partition tests under a false-alarm budget, history, HTML report"
EPILOG = (
    "exit status: 0 no shift; 3 a partition shifted; 4 could not run (a partition not scored, or bad input); "
    "2 a wrong command line"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--detector", required=True, help="detector folder URL")
    parser.add_argument("--data", required=True, help="the lake: Parquet shards or image folders, any layout")
    parser.add_argument("--scores", required=True, help="score tables (written here by the score pass when missing)")
    parser.add_argument("--history", required=True, help="history table folder: one row per partition and stream")
    parser.add_argument("--report", required=True, help="folder for index.html (self-contained) and summary.json")
    parser.add_argument(
        "--partitions",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="input folders to monitor (globs, one segment per folder level); each is tested once per version",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--nights-per-false-alarm",
        type=float,
        default=None,
        metavar="N",
        help="lifetime budget (the default, N = 365): at most one false alarm in expectation per N nights",
    )
    budget.add_argument(
        "--alpha", type=float, default=None, help="per-night budget instead: false-alarm level across a night"
    )
    parser.add_argument(
        "--correction",
        default="bh",
        choices=["bh", "bonferroni"],
        help="per-night correction across the night's partitions (with --alpha)",
    )
    parser.add_argument(
        "--min-excess",
        type=float,
        default=0.01,
        help="a shift must move at least this share of a partition's rows beyond the reference (a lower bound)...",
    )
    parser.add_argument(
        "--min-mean-shift",
        type=float,
        default=0.1,
        help="...or the layers' mean by at least this many in-distribution SDs (Mahalanobis, a lower bound)",
    )
    parser.add_argument(
        "--reference-risk",
        type=float,
        default=0.05,
        metavar="DELTA",
        help="the budgets hold for all but this share of references: the tests allow for the reference's own "
        "error with probability 1 - DELTA",
    )
    parser.add_argument(
        "--stream",
        default=None,
        help="the name of the monitored stream the lifetime budget runs over (default: this data with this detector)",
    )
    parser.add_argument(
        "--allow-training-rows",
        action="store_true",
        help="monitor even when the detector was fitted on rows the model was trained on (its nulls are then wrong)",
    )
    add_pipeline_options(parser)


def run(args: argparse.Namespace) -> int:
    from fimood.method.shift import LifetimeBudget, NightlyBudget
    from fimood.monitor import EXIT_COULD_NOT_RUN, MonitorConfig, run_monitor

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the monitor's report draws with matplotlib: pip install 'fimood[plot]'")
    if args.alpha is None and args.correction != "bh":
        raise UsageError("--correction applies to the per-night budget: give --alpha too")
    budget = (
        NightlyBudget(args.alpha, args.correction)
        if args.alpha is not None
        else LifetimeBudget(args.nights_per_false_alarm or 365.0)
    )
    config = MonitorConfig(
        detector=args.detector,
        data=args.data,
        scores=args.scores,
        history=args.history,
        report=args.report,
        partitions=tuple(args.partitions),
        budget=budget,
        min_excess=args.min_excess,
        min_mean_shift=args.min_mean_shift,
        reference_risk=args.reference_risk,
        stream=args.stream,
        allow_training_rows=args.allow_training_rows,
        pipeline=pipeline_config(args),
    )
    try:
        result = run_monitor(config)
    except (ValueError, FileNotFoundError, PermissionError, StorageUnavailable, ConcurrentWriters) as error:
        print(f"fimood monitor: could not run: {error}", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    report = result.report_page or f"NOT WRITTEN: {result.report_error}"
    print(f"{result}\nreport: {report}")
    return result.exit_code
