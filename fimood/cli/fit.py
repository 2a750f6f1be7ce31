"""fimood fit: fit the detector on in-distribution rows, through the Ray pipeline."""

from __future__ import annotations

import argparse

from fimood.cli.options import add_pipeline_options, pipeline_config
from fimood.method.scoring import DEFAULT_RULE, SCORING_RULES

HELP = "fit the detector on in-distribution rows the model was not trained on (Ray pipeline)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder URL")
    parser.add_argument("--data", required=True, help="in-distribution rows: a Parquet file or folder")
    parser.add_argument("--out", required=True, help="detector folder URL")
    parser.add_argument("--fpr", type=float, default=0.05, help="false-positive rate that sets the threshold")
    parser.add_argument(
        "--rule", default=DEFAULT_RULE, choices=sorted(SCORING_RULES), help="scoring rule (docs/scoring-rules.md)"
    )
    parser.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.2,
        help="share of rows (by a hash of the id) held out to calibrate",
    )
    parser.add_argument(
        "--max-calibration-rows", type=int, default=100_000, help="bound on calibration rows kept on the driver"
    )
    add_pipeline_options(parser)


def run(args: argparse.Namespace) -> int:
    from fimood import passes
    from fimood.method.detector import DetectorSettings

    settings = DetectorSettings(
        rule=args.rule,
        false_positive_rate=args.fpr,
        calibration_fraction=args.calibration_fraction,
    )
    config = pipeline_config(args)
    detector, summary = passes.fit(
        args.model, args.data, config, settings, max_calibration_rows=args.max_calibration_rows
    )
    detector_id = detector.save(args.out, args.storage_options)
    print(f"fit: {summary}")
    print(f"detector {detector_id}: {detector.describe()}; saved to {args.out}")
    return 0
