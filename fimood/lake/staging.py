"""A run's staging folder inside the output, `<output>/_staging/<run>/`, where Ray's write tasks put
score rows before the commit. Delta readers never look there (they read what the table's log lists).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fimood.storage import join, resilient

logger = logging.getLogger(__name__)

STAGING = "_staging"
HEARTBEAT = "_HEARTBEAT"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0  # a run whose heartbeat is older than this is dead; its staging can go


@dataclass
class Staging:
    """A run's staging folder, `<output>/_staging/<run>/`, kept alive by a heartbeat file.

    Staging left by a dead run (its heartbeat older than STALE_AFTER_SECONDS) is removed by the
    next run on the same output; a live run's is left alone, so runs at once can share one output.
    """

    fs: object
    out_root: str
    run: str = field(default_factory=lambda: f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        self.fs = resilient(self.fs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> str:
        return join(self.out_root, STAGING)

    @property
    def path(self) -> str:
        return join(self.root, self.run)

    def __enter__(self) -> Staging:
        self.remove_dead_runs()
        self.fs.makedirs(self.path, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._keep_beating, name="fimood-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        with contextlib.suppress(OSError):  # another run may have just made its own staging there
            if self.fs.exists(self.root) and not self.fs.ls(self.root):
                self.fs.rmdir(self.root)

    def _beat(self) -> None:
        self.fs.pipe_file(join(self.path, HEARTBEAT), json.dumps({"time": time.time()}).encode())

    def _keep_beating(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._beat()
            except Exception:  # a missed beat only makes the run look older; it must not kill the run
                logger.warning("could not refresh the staging heartbeat of run %s", self.run, exc_info=True)

    def remove_dead_runs(self) -> None:
        if not self.fs.exists(self.root):
            return
        for run_path in self.fs.ls(self.root, detail=False):
            heartbeat = f"{run_path.rstrip('/')}/{HEARTBEAT}"
            beat = json.loads(self.fs.cat_file(heartbeat))["time"] if self.fs.exists(heartbeat) else 0.0
            if time.time() - beat > STALE_AFTER_SECONDS:
                logger.warning("removing staging left by a run that died: %s", run_path)
                self.fs.rm(run_path, recursive=True)
