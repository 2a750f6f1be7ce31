"""Nightly dataset-shift monitoring: score what is new, summarise each partition in Ray, test it against
the detector's reference under a false-alarm budget, keep the history, write the report.

    partitions ──score pass (resume, z-scores)──► score tables ──Ray reduce──► PartitionSummary each
        ──shift tests + budget (the stream's history for the lifetime budget)──► verdicts ──► history, exit code

A *stream* is what the lifetime budget runs over: one monitored dataset with one detector (or a name
the user gives). Each run of the monitor is one night of its stream, however many partitions it tests.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from fimood.apps.stages import Stages
from fimood.lake.history import read_history, write_history_rows
from fimood.lake.sources import list_partitions
from fimood.method.detector import DetectorArtifact, training_rows_in_fit
from fimood.method.shift import (
    DEFAULT_REFERENCE_RISK,
    Evidence,
    Guarantee,
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
from fimood.storage import absolute_url, sha256_hex

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_SHIFT, EXIT_COULD_NOT_RUN = 0, 3, 4
DEFAULT_MIN_EXCESS = 0.01  # a shift moves at least 1% of a partition's rows away from the reference...
DEFAULT_MIN_MEAN_SHIFT = 0.1  # ...or the layers' mean by a tenth of an in-distribution standard deviation
STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
    reference_risk: float = DEFAULT_REFERENCE_RISK
    stream: str | None = None  # the lifetime budget's stream; None: this data with this detector
    allow_training_rows: bool = False  # monitor against a reference that shares rows with the model's training data
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_excess < 1.0:
            raise ValueError(f"min_excess must be in [0, 1), got {self.min_excess}")
        if self.min_mean_shift < 0.0:
            raise ValueError(f"min_mean_shift must be at least 0, got {self.min_mean_shift}")
        if not 0.0 < self.reference_risk < 1.0:
            raise ValueError(f"reference_risk must be in (0, 1), got {self.reference_risk}")
        if self.stream is not None and not STREAM_NAME.fullmatch(self.stream):
            raise ValueError(f"stream must be letters, digits, '.', '_' or '-' (at most 128), got {self.stream!r}")

    def stream_name(self, detector_id: str) -> str:
        """The stream's name: the one given, else the detector's id and a hash of the data's URL."""
        return self.stream or f"{detector_id}-{sha256_hex(absolute_url(self.data).encode())[:8]}"


@dataclass
class PartitionVerdict:
    """One partition of this run: its summary, tests and verdict ("ok", "shift" or "could not run")."""

    partition: str
    verdict: str
    summary: PartitionSummary | None = None
    tests: ShiftTests | None = None
    e_value: float = 1.0
    statistic: float = 0.0  # the lifetime detector's R after this night, or the partition's adjusted p-value
    guarantee: Guarantee | None = None  # what the reference promises for a night of this partition's size
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
    history: list[dict]  # every history row of the stream after this run, in partition order
    seconds: float
    unreadable: dict[str, str] = field(default_factory=dict)  # input shards left out: path → why
    min_mean_shift: float = DEFAULT_MIN_MEAN_SHIFT
    stream: str = ""

    @property
    def guarantee(self) -> Guarantee | None:
        """The guarantee for this run's largest tested partition (the one the reference's error weighs on most)."""
        tested = [v for v in self.verdicts if v.guarantee is not None]
        return max(tested, key=lambda v: v.guarantee.rows).guarantee if tested else None

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
        lines = [f"monitor: {len(self.verdicts)} partitions: {text} ({self.budget.describe()}; stream {self.stream})"]
        if self.guarantee is not None:
            lines.append(f"  guarantee: {self.guarantee}")
            if self.guarantee.reference_dominates:
                lines.append(f"  WARNING: {REFERENCE_DOMINATES}")
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


REFERENCE_DOMINATES = (
    "the reference's own error dominates at this night size (more rows a night than calibration or fit rows): "
    "the tests allow for it, so only effects above the guarantee's are flagged; fit on more rows to see smaller ones"
)


def check_reference_is_fresh(detector: DetectorArtifact, allow_training_rows: bool) -> None:
    """Refuse (unless allowed) a reference fitted on rows the model was trained on: those rows fit the model
    better than fresh in-distribution rows do, so every fresh night would look shifted against them."""
    shared = training_rows_in_fit(detector)
    if shared is None:
        logger.warning(
            "the model does not record its training data, so the monitor cannot check that the "
            "detector's fit rows are fresh (train with `fimood train` to record it)"
        )
    elif shared and not allow_training_rows:
        raise ValueError(
            f"{shared} of the detector's fit rows are rows the model was trained on, so fresh in-distribution "
            "nights would look shifted against it; fit the detector on rows the model did not see "
            "(e.g. train with --id-hash-range 0 0.75 and fit on the rest), or pass --allow-training-rows"
        )


def run_monitor(config: MonitorConfig) -> MonitorResult:
    """Score, summarise and test the selected partitions as one night of the stream; write its history rows."""
    start = time.perf_counter()
    stages = Stages("monitor", 4)
    detector = DetectorArtifact.load(config.detector, config.pipeline.storage_options)
    check_reference_is_fresh(detector, config.allow_training_rows)
    reference = Reference.of(detector.by_group[1], detector.feature_names, config.reference_risk)
    stream = config.stream_name(detector.detector_id)
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
        guarantee = reference.guarantee(
            max(tests.scored, 1),
            config.budget.level,
            config.budget.describe(),
            config.min_excess,
            config.min_mean_shift,
        )
        verdicts.append(
            PartitionVerdict(
                folder,
                "ok",
                found.summary,
                tests,
                e_value(tests.p_value),
                tests.p_value,
                guarantee,
                most_ood=found.most_ood,
            )
        )
    verdicts.sort(key=lambda v: v.partition)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tested = [v for v in verdicts if v.tests is not None]
    tested_names = {v.partition for v in tested}
    earlier = [
        row
        for row in read_history(config.history, stream, config.pipeline.storage_options)
        if row["partition"] not in tested_names
    ]
    _decide(tested, earlier, config)
    if tested and any(v.guarantee.reference_dominates for v in tested):
        logger.warning("monitor: %s", REFERENCE_DOMINATES)

    stages.start("write the history")
    for verdict in verdicts:
        if verdict.verdict == "shift" and verdict.most_ood:
            partition = next(p for p in listed if p.folder == verdict.partition)
            verdict.thumbnails = fetch_images(
                partition,
                config.pipeline.read_spec(config.data),
                [row_id for _, row_id in verdict.most_ood],
            )
    rows = [history_row(v, detector.detector_id, stream, config, now) for v in tested]
    write_history_rows(config.history, stream, rows, HISTORY_SCHEMA, config.pipeline.storage_options)
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
        stream,
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
    # lifetime: the stream's nights in the order they were monitored, this run the last
    nights: dict[str, list[Evidence]] = {}
    for row in earlier:
        gate = row["excess"] >= config.min_excess or (row.get("mean_shift") or 0.0) >= config.min_mean_shift
        nights.setdefault(row["monitored_at"], []).append(Evidence(row["partition"], row["p_value"], gate))
    tonight = [Evidence(v.partition, v.tests.p_value, large[v.partition]) for v in tested]
    order = sorted(nights)
    path, alarms = config.budget.night_statistics([*(nights[night] for night in order), tonight])
    by_partition = {e.partition: e for e in tonight}
    for verdict in tested:
        verdict.statistic = path[-1]
        verdict.verdict = "shift" if by_partition[verdict.partition] in alarms[-1] else "ok"


HISTORY_SCHEMA = pa.schema(
    [
        ("partition", pa.string()),
        ("detector_id", pa.string()),
        ("monitored_at", pa.string()),
        ("verdict", pa.string()),
        ("stream", pa.string()),
        ("budget", pa.string()),
        ("min_excess", pa.float64()),
        ("reference_risk", pa.float64()),
        ("detectable_rate_excess", pa.float64()),
        ("detectable_mean_shift", pa.float64()),
        ("reference_dominates", pa.bool_()),
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


def history_row(verdict: PartitionVerdict, detector_id: str, stream: str, config: MonitorConfig, now: str) -> dict:
    """What the history keeps of one partition: its summary (mergeable), its tests and its verdict."""
    tests, summary, guarantee = verdict.tests, verdict.summary, verdict.guarantee
    return {
        "partition": verdict.partition,
        "detector_id": detector_id,
        "monitored_at": now,
        "verdict": verdict.verdict,
        "stream": stream,
        "budget": config.budget.describe(),
        "min_excess": config.min_excess,
        "reference_risk": guarantee.risk,
        "detectable_rate_excess": guarantee.detectable_rate_excess,
        "detectable_mean_shift": guarantee.detectable_mean_shift,
        "reference_dominates": guarantee.reference_dominates,
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
