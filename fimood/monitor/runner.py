"""Nightly dataset-shift monitoring: score what is new, summarise each partition in Ray, test it against
the detector's reference under a false-alarm budget, keep the history, write the report.

    partitions ──score pass (resume, z-scores)──► score tables ──Ray reduce──► PartitionSummary each
        ──shift tests + budget (the stream's history for the lifetime budget)──► verdicts ──► history, exit code

A night tests only the partitions that are new or changed since the stream last tested them (their
score version differs from the one its history row names): a partition is tested once per version,
and a night's cost follows what arrived, not the lake's age.

A *stream* is what the lifetime budget runs over: one monitored dataset with one detector (or a name
the user gives). Each run of the monitor is one night of its stream, however many partitions it tests.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fimood.lake.score_table import ScoreTable
from fimood.lake.sources import list_partitions
from fimood.method.detector import DetectorArtifact, training_rows_in_fit
from fimood.method.shift import (
    DEFAULT_MIN_EXCESS,
    DEFAULT_MIN_MEAN_SHIFT,
    DEFAULT_REFERENCE_RISK,
    Evidence,
    LifetimeBudget,
    NightlyBudget,
    Reference,
    e_value,
    large_effect,
    shift_tests,
)
from fimood.monitor.history import check_history, history_row, read_stream, write_history_rows
from fimood.monitor.report import write_monitor_report
from fimood.monitor.result import REFERENCE_DOMINATES, MonitorResult, PartitionVerdict
from fimood.passes import PipelineConfig, ScoringFailed, score, start_ray
from fimood.passes.summaries import fetch_images, summarise_partitions
from fimood.progress import Stages
from fimood.storage import absolute_url, sha256_hex

logger = logging.getLogger(__name__)

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
    """Score, summarise and test the selected partitions as one night of the stream; write its history rows
    and the report (`config.report`: index.html and summary.json)."""
    start = time.perf_counter()
    stages = Stages("monitor", 5)
    detector = DetectorArtifact.load(config.detector, config.pipeline.storage_options)
    check_reference_is_fresh(detector, config.allow_training_rows)
    reference = Reference.of(detector.per_row, detector.feature_names, config.reference_risk)
    stream = config.stream_name(detector.detector_id)
    listed = list_partitions(
        config.data, config.pipeline.input_format, config.pipeline.storage_options, config.partitions
    )
    check_history(config.history, config.pipeline.storage_options)  # a history it cannot write: before any work

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
            listed=listed,
        )
        logger.info("monitor: %s", summary)
    except ScoringFailed as failure:
        failed = {p.folder: p.reason for p in failure.summary.failed}
        unreadable = failure.summary.unreadable
        logger.warning("monitor: %s", failure)

    stages.start("summarise each new or changed partition (Ray)")
    history = read_stream(config.history, stream, config.pipeline.storage_options)  # the budget's past nights
    selected = [p.folder for p in listed if p.folder not in failed]
    folders = _untested(selected, history.rows, config)
    unchanged = set(selected) - set(folders)
    start_ray(config.pipeline.address)
    summaries = summarise_partitions(
        config.scores,
        folders,
        detector.per_row.calibration_scores_,
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
                scores_version=found.scores_version,
            )
        )
    verdicts.sort(key=lambda v: v.partition)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tested = [v for v in verdicts if v.tests is not None]
    tested_names = {v.partition for v in tested}
    earlier = [row for row in history.rows if row["partition"] not in tested_names]
    _decide(tested, earlier, config)
    if tested and any(v.guarantee.reference_dominates for v in tested):
        logger.warning("monitor: %s", REFERENCE_DOMINATES)

    stages.start("write the history")
    rows = [
        history_row(v, detector.detector_id, stream, config.budget.describe(), config.min_excess, now) for v in tested
    ]
    write_history_rows(config.history, stream, rows, config.pipeline.storage_options, read=history)
    result = MonitorResult(
        detector.detector_id,
        reference,
        config.budget,
        config.min_excess,
        verdicts,
        history=sorted(earlier + rows, key=lambda row: row["partition"]),
        seconds=0.0,
        unreadable=unreadable,
        min_mean_shift=config.min_mean_shift,
        stream=stream,
        unchanged=len(unchanged),
        still_shifted=[row for row in earlier if row["partition"] in unchanged and row["verdict"] == "shift"],
    )

    stages.start(f"write the report under {config.report}")
    result.seconds = time.perf_counter() - start
    try:  # the verdicts and the history stand whatever happens to the report: it is said, not raised
        for verdict in verdicts:
            if verdict.verdict == "shift" and verdict.most_ood:
                partition = next(p for p in listed if p.folder == verdict.partition)
                verdict.thumbnails = fetch_images(
                    partition, config.pipeline.read_spec(config.data), [row_id for _, row_id in verdict.most_ood]
                )
        result.report_page, _ = write_monitor_report(result, config.report, config.pipeline.storage_options)
    except Exception as error:
        result.report_error = f"{type(error).__name__}: {error}"
        logger.error("monitor: the report could not be written (%s); the verdicts and history are", error)
    return result


def _untested(folders: list[str], history: list[dict], config: MonitorConfig) -> list[str]:
    """The folders whose committed score version is not the one the stream's history tested."""
    tested = {row["partition"]: row.get("scores_version") for row in history}
    committed = ScoreTable(config.scores, config.pipeline.storage_options).committed()
    return [f for f in folders if tested.get(f) is None or tested[f] != getattr(committed.get(f), "key", None)]


def _decide(tested: list[PartitionVerdict], earlier: list[dict], config: MonitorConfig) -> None:
    """Each tested partition's verdict: the budget's decision over the stream's nights, tonight the last."""
    nights: dict[str, list[Evidence]] = {}  # the stream's earlier nights, by when they were monitored
    for row in earlier:
        large = large_effect(row["excess"], row.get("mean_shift") or 0.0, config.min_excess, config.min_mean_shift)
        nights.setdefault(row["monitored_at"], []).append(Evidence(row["partition"], row["p_value"], large))
    tonight = [
        Evidence(v.partition, v.tests.p_value, v.tests.large(config.min_excess, config.min_mean_shift)) for v in tested
    ]
    decision = config.budget.decide([nights[night] for night in sorted(nights)], tonight)
    for verdict in tested:
        verdict.statistic = decision.statistics[verdict.partition]
        verdict.verdict = "shift" if verdict.partition in decision.shifted else "ok"
