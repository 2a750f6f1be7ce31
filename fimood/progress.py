"""How long work reports itself: one line per stage of a multi-stage command, rates and error counts."""

from __future__ import annotations

import logging

logger = logging.getLogger("fimood")


class Stages:
    """Counts a command's stages and announces each as it starts."""

    def __init__(self, command: str, total: int):
        self.command, self.total, self.done = command, total, 0

    def start(self, what: str) -> None:
        self.done += 1
        logger.info("%s: stage %d of %d: %s", self.command, self.done, self.total, what)


def count_errors(by_reason: dict[str, int]) -> str:
    """`3 errors: 2 image is missing; 1 ...`, most frequent reason first."""
    reasons = "; ".join(f"{count} {reason}" for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1]))
    return f"{sum(by_reason.values())} errors" + (f": {reasons}" if reasons else "")


def rate(rows: int, seconds: float) -> str:
    """`12.3 s, 456.7 rows/s`."""
    return f"{seconds:.1f} s, {rows / max(seconds, 1e-9):.1f} rows/s"
