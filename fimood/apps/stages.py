"""One progress line per stage of a multi-stage command: `demo: stage 2 of 5: train Glow (1500 steps)`."""

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
