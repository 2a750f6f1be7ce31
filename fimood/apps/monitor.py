"""Nightly dataset-shift monitoring: score what is new, summarise each partition in Ray, test it against
the detector's reference under a false-alarm budget, keep the history, write the report.

    partitions ──score pass (resume, z-scores)──► score tables ──Ray reduce──► PartitionSummary each
        ──shift tests + budget (history for the lifetime budget)──► verdicts ──► history, report, exit code
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from fimood.apps.stages import Stages
from fimood.lake.history import read_history, write_history_rows
from fimood.lake.sources import list_partitions
from fimood.method.detector import DetectorArtifact
from fimood.method.shift import (
    LifetimeBudget,
    NightlyBudget,
    PartitionSummary,
    Reference,
    ShiftTests,
    e_value,
    shift_tests,
)
from fimood.passes import PipelineConfig, ScoringFailed, score, start_ray
from fimood.passes.summaries import fetch_images, summarise_partitions

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_SHIFT, EXIT_COULD_NOT_RUN = 0, 3, 4
DEFAULT_MIN_EXCESS = 0.01  # a shift moves at least 1% of a partition's rows away from the reference...
DEFAULT_MIN_MEAN_SHIFT = 0.1  # ...or the layers' mean by a tenth of an in-distribution standard deviation


@dataclass(frozen=True)
class MonitorConfig:
    detector: str
    data: str
    scores: str
    history: str
    report: str
    partitions: tuple[str, ...] = ()
    budget: NightlyBudget | LifetimeBudget = field(default_factory=LifetimeBudget)
    min_excess: float = DEFAULT_MIN_EXCESS
    min_mean_shift: float = DEFAULT_MIN_MEAN_SHIFT
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_excess < 1.0:
            raise ValueError(f"min_excess must be in [0, 1), got {self.min_excess}")
        if self.min_mean_shift < 0.0:
            raise ValueError(f"min_mean_shift must be at least 0, got {self.min_mean_shift}")


@dataclass
class PartitionVerdict:
    """One partition of this run: its summary, tests and verdict ("ok", "shift" or "could not run")."""

    partition: str
    verdict: str
    summary: PartitionSummary | None = None
    tests: ShiftTests | None = None
    e_value: float = 1.0
    statistic: float = 0.0  # the lifetime detector's R, or the night's adjusted p-value
    reason: str = ""
    most_ood: list[tuple[float, str]] = field(default_factory=list)
    thumbnails: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class MonitorResult:
    detector_id: str
    reference: Reference
    budget: NightlyBudget | LifetimeBudget
    min_excess: float
    verdicts: list[PartitionVerdict]
    history: list[dict]  # every history row of the detector after this run, in partition order
    seconds: float
    unreadable: dict[str, str] = field(default_factory=dict)  # input shards left out: path → why
    min_mean_shift: float = DEFAULT_MIN_MEAN_SHIFT

    @property
    def exit_code(self) -> int:
        if any(v.verdict == "shift" for v in self.verdicts):
            return EXIT_SHIFT
        if self.unreadable or any(v.verdict == "could not run" for v in self.verdicts):
            return EXIT_COULD_NOT_RUN
        return EXIT_OK

    def __str__(self) -> str:
        counts = {name: sum(v.verdict == name for v in self.verdicts) for name in ("ok", "shift", "could not run")}
        text = ", ".join(f"{count} {name}" for name, count in counts.items() if count) or "no partitions"
        lines = [f"monitor: {len(self.verdicts)} partitions: {text} ({self.budget.describe()})"]
        for verdict in self.verdicts:
            if verdict.verdict == "shift":
                layers = ", ".join(verdict.tests.top_layers[:3]) or "none singled out"
                lines.append(
                    f"  SHIFT {verdict.partition}: OOD rate {verdict.tests.ood_rate:.1%} "
                    f"(expected {verdict.tests.expected_rate:.1%}), excess {verdict.tests.excess:.1%}, "
                    f"mean shift {verdict.tests.mean_shift:.2f}; layers: {layers}"
                )
            elif verdict.verdict == "could not run":
                lines.append(f"  COULD NOT RUN {verdict.partition}: {verdict.reason}")
        lines += [f"  UNREADABLE shard, left out: {path}: {why}" for path, why in sorted(self.unreadable.items())]
        return "\n".join(lines)


def run_monitor(config: MonitorConfig) -> MonitorResult:
    """Score, summarise and test the selected partitions; write history rows for them."""
    start = time.perf_counter()
    stages = Stages("monitor", 4)
    detector = DetectorArtifact.load(config.detector, config.pipeline.storage_options)
    reference = Reference.of(detector.by_group[1], detector.feature_names)
    listed = list_partitions(
        config.data, config.pipeline.input_format, config.pipeline.storage_options, config.partitions
    )
    if not listed:
        raise ValueError(f"{config.data}: no partitions to monitor (nothing matches {list(config.partitions)})")

    stages.start(f"score the partitions without a current score table ({len(listed)} selected)")
    failed, unreadable = {}, {}
    try:
        summary = score(
            config.detector,
            config.data,
            config.scores,
            config.pipeline,
            resume=True,
            z_scores=True,
            partitions=config.partitions,
        )
        logger.info("monitor: %s", summary)
    except ScoringFailed as failure:
        failed = {p.folder: p.reason for p in failure.summary.failed}
        unreadable = failure.summary.unreadable
        logger.warning("monitor: %s", failure)

    stages.start("summarise each partition (Ray)")
    start_ray(config.pipeline.address)
    folders = [p.folder for p in listed if p.folder not in failed]
    summaries = summarise_partitions(
        config.scores,
        folders,
        detector.by_group[1].calibration_scores_,
        len(reference.layer_names),
        config.pipeline.storage_options,
    )

    stages.start("test each partition against the reference")
    verdicts = [PartitionVerdict(folder, "could not run", reason=reason) for folder, reason in failed.items()]
    for folder in folders:
        found = summaries[folder]
        tests = shift_tests(found.summary, reference)
        verdicts.append(
            PartitionVerdict(
                folder, "ok", found.summary, tests, e_value(tests.p_value), tests.p_value, most_ood=found.most_ood
            )
        )
    verdicts.sort(key=lambda v: v.partition)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tested = [v for v in verdicts if v.tests is not None]
    tested_names = {v.partition for v in tested}
    earlier = [
        row
        for row in read_history(config.history, detector.detector_id, config.pipeline.storage_options)
        if row["partition"] not in tested_names
    ]
    _decide(tested, earlier, config)

    stages.start("write the history")
    for verdict in verdicts:
        if verdict.verdict == "shift" and verdict.most_ood:
            partition = next(p for p in listed if p.folder == verdict.partition)
            verdict.thumbnails = fetch_images(
                partition,
                config.pipeline.read_spec(config.data),
                [row_id for _, row_id in verdict.most_ood],
            )
    rows = [history_row(v, detector.detector_id, config, now) for v in tested]
    write_history_rows(config.history, detector.detector_id, rows, HISTORY_SCHEMA, config.pipeline.storage_options)
    history = sorted(earlier + rows, key=lambda row: row["partition"])
    return MonitorResult(
        detector.detector_id,
        reference,
        config.budget,
        config.min_excess,
        verdicts,
        history,
        time.perf_counter() - start,
        unreadable,
        config.min_mean_shift,
    )


def _decide(tested: list[PartitionVerdict], earlier: list[dict], config: MonitorConfig) -> None:
    """Each tested partition's verdict under the budget: significant, and its effect large enough."""
    large = {v.partition: v.tests.large(config.min_excess, config.min_mean_shift) for v in tested}
    if isinstance(config.budget, NightlyBudget):
        adjusted = config.budget.adjusted([v.tests.p_value for v in tested])
        for verdict, p_value in zip(tested, adjusted, strict=True):
            verdict.statistic = p_value
            verdict.verdict = "shift" if p_value <= config.budget.alpha and large[verdict.partition] else "ok"
        return
    # lifetime: the Shiryaev–Roberts path over every partition the history knows, in partition order
    sequence = sorted(
        [
            (
                row["partition"],
                row["p_value"],
                row["excess"] >= config.min_excess or (row.get("mean_shift") or 0.0) >= config.min_mean_shift,
            )
            for row in earlier
        ]
        + [(v.partition, v.tests.p_value, large[v.partition]) for v in tested]
    )
    path, alarms = config.budget.statistics([p for _, p, _ in sequence], [allowed for _, _, allowed in sequence])
    by_partition = {name: (r, alarm) for (name, _, _), r, alarm in zip(sequence, path, alarms, strict=True)}
    for verdict in tested:
        verdict.statistic, alarm = by_partition[verdict.partition]
        verdict.verdict = "shift" if alarm else "ok"


HISTORY_SCHEMA = pa.schema(
    [
        ("partition", pa.string()),
        ("detector_id", pa.string()),
        ("monitored_at", pa.string()),
        ("verdict", pa.string()),
        ("budget", pa.string()),
        ("min_excess", pa.float64()),
        ("rows", pa.int64()),
        ("scored", pa.int64()),
        ("errors_by_reason", pa.list_(pa.struct([("reason", pa.string()), ("count", pa.int64())]))),
        ("flagged", pa.int64()),
        *[
            (name, pa.float64())
            for name in (
                "ood_rate",
                "expected_rate",
                "excess_rate_ci_low",
                "excess_rate_ci_high",
                "rate_p",
                "auc",
                "rank_p",
                "layers_p",
                "excess",
                "mean_shift",
                "largest_layer_shift",
                "p_value",
                "e_value",
                "statistic",
            )
        ],
        ("top_layers", pa.list_(pa.string())),
        ("layer_shift", pa.list_(pa.float64())),
        ("rank_counts", pa.list_(pa.int64())),
        ("z_sum", pa.list_(pa.float64())),
        ("z_sq_sum", pa.list_(pa.float64())),
    ]
)


def history_row(verdict: PartitionVerdict, detector_id: str, config: MonitorConfig, now: str) -> dict:
    """What the history keeps of one partition: its summary (mergeable), its tests and its verdict."""
    tests, summary = verdict.tests, verdict.summary
    return {
        "partition": verdict.partition,
        "detector_id": detector_id,
        "monitored_at": now,
        "verdict": verdict.verdict,
        "budget": config.budget.describe(),
        "min_excess": config.min_excess,
        "rows": summary.rows,
        "scored": tests.scored,
        "errors_by_reason": [{"reason": k, "count": n} for k, n in sorted(summary.errors_by_reason.items())],
        "flagged": tests.flagged,
        "ood_rate": tests.ood_rate,
        "expected_rate": tests.expected_rate,
        "excess_rate_ci_low": tests.excess_rate_ci[0],
        "excess_rate_ci_high": tests.excess_rate_ci[1],
        "rate_p": tests.rate_p,
        "auc": tests.auc,
        "rank_p": tests.rank_p,
        "layers_p": tests.layers_p,
        "excess": tests.excess,
        "mean_shift": tests.mean_shift,
        "largest_layer_shift": tests.largest_layer_shift,
        "p_value": tests.p_value,
        "e_value": verdict.e_value,
        "statistic": verdict.statistic,
        "top_layers": tests.top_layers,
        "layer_shift": tests.layer_shift.tolist(),
        "rank_counts": summary.rank_counts.tolist(),
        "z_sum": summary.z_sum.tolist(),
        "z_sq_sum": summary.z_sq_sum.tolist(),
    }
