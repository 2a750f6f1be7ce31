"""What a monitor run found: one verdict per partition, the run's guarantee, its exit code."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fimood.method.shift import (
    DEFAULT_MIN_MEAN_SHIFT,
    Guarantee,
    LifetimeBudget,
    NightlyBudget,
    PartitionSummary,
    Reference,
    ShiftTests,
)

EXIT_OK, EXIT_SHIFT, EXIT_COULD_NOT_RUN = 0, 3, 4


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
    scores_version: str | None = None  # the score version tested (`Committed.key`): the next night skips it


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
    report_page: str = ""  # the report's index.html, once written
    report_error: str = ""  # why the report could not be written (the verdicts and history were)
    unchanged: int = 0  # selected partitions tested on an earlier night, unchanged since: not tested again
    still_shifted: list[dict] = field(default_factory=list)  # history rows of unchanged partitions found shifted

    @property
    def shifted(self) -> list[str]:
        """The selected partitions shifted: tonight's, and those found shifted earlier and unchanged since
        (a rerun does not clear an alarm; a new version of the partition's shards does)."""
        tonight = [v.partition for v in self.verdicts if v.verdict == "shift"]
        return sorted(tonight + [row["partition"] for row in self.still_shifted])

    @property
    def guarantee(self) -> Guarantee | None:
        """The guarantee for this run's largest tested partition (the one the reference's error weighs on most)."""
        tested = [v for v in self.verdicts if v.guarantee is not None]
        return max(tested, key=lambda v: v.guarantee.rows).guarantee if tested else None

    @property
    def exit_code(self) -> int:
        if self.shifted:
            return EXIT_SHIFT
        if self.unreadable or any(v.verdict == "could not run" for v in self.verdicts):
            return EXIT_COULD_NOT_RUN
        return EXIT_OK

    def __str__(self) -> str:
        counts = {name: sum(v.verdict == name for v in self.verdicts) for name in ("ok", "shift", "could not run")}
        text = ", ".join(f"{count} {name}" for name, count in counts.items() if count) or "none new"
        unchanged = f"; {self.unchanged} unchanged since tested" if self.unchanged else ""
        budget = f"{self.budget.describe()}; stream {self.stream}"
        lines = [f"monitor: {len(self.verdicts)} partitions: {text}{unchanged} ({budget})"]
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
        lines += [
            f"  STILL SHIFT {row['partition']}: found shifted {row['monitored_at']}, unchanged since"
            for row in self.still_shifted
        ]
        lines += [f"  UNREADABLE shard, left out: {path}: {why}" for path, why in sorted(self.unreadable.items())]
        return "\n".join(lines)


REFERENCE_DOMINATES = (
    "the reference's own error dominates at this night size (more rows a night than calibration or fit rows): "
    "the tests allow for it, so only effects above the guarantee's are flagged; fit on more rows to see smaller ones"
)
