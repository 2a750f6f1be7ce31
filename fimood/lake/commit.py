"""Output partitions committed whole: a manifest marker per folder, a journal while a commit runs.

A partition's `_SUCCESS` marker is its manifest: the detector id, the input shards it covers and the
data files of its current version. A commit never touches a file its partition's marker did not
list, so a user's file in the output (or the input itself) is never replaced:

1. `_COMMITTING` records the files about to come in, and the version they replace (its marker);
2. `_SUCCESS` is removed, so a reader that globs `*.parquet` never takes the folder for complete;
3. the staged files move in under new names (the previous version's files stay as they are);
4. the new `_SUCCESS` is written (one atomic write: a rename locally, one PUT on object stores);
5. the replaced files are deleted, then `_COMMITTING`.

Readers that honour the manifests (`read_committed`) read the previous version from the journal
until step 4 and the new one after it: old or new, never a mix and never nothing, on object stores
too. A commit killed halfway is finished (after step 4) or rolled back to the previous version
(before it) by `recover`, from the journal, before the folder is used again. Every call to the
store is retried while it does not answer (`fimood.storage.retrying`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from fimood.storage import StorageOptions, filesystem, join, resilient, write_file

logger = logging.getLogger(__name__)

MARKER = "_SUCCESS"
JOURNAL = "_COMMITTING"
STAGING = "_staging"
HEARTBEAT = "_HEARTBEAT"
MARKER_FORMAT_VERSION = 1
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0  # a run whose heartbeat is older than this is dead; its staging can go


@dataclass(frozen=True)
class Marker:
    """What `_SUCCESS` says of a committed partition."""

    detector_id: str
    inputs: list[dict]  # {"path", "size", "version"} of every input shard the partition's rows came from
    files: list[str]  # the partition's data files, by name inside its folder
    rows: int
    errors: int
    z_scores: bool = False  # the files hold per-layer z-scores
    run: str = ""
    committed_at: str = ""
    format_version: int = MARKER_FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps({"format": "fimood-commit", **asdict(self)}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Marker:
        return cls.from_document(json.loads(data))

    @classmethod
    def from_document(cls, document: dict) -> Marker:
        document = dict(document)
        if document.get("format_version") != MARKER_FORMAT_VERSION:
            raise ValueError(
                f"a commit marker of format_version {document.get('format_version')!r} (this fimood reads "
                f"{MARKER_FORMAT_VERSION}); score into a new output folder, or remove the old one"
            )
        document.pop("format", None)
        return cls(**document)

    def covers(self, detector_id: str, inputs: list[dict], z_scores: bool = False) -> bool:
        """True when this version was made by `detector_id` from exactly these inputs (with z-scores, if asked)."""
        same = self.detector_id == detector_id and _input_set(self.inputs) == _input_set(inputs)
        return same and (self.z_scores or not z_scores)


def _input_set(inputs: list[dict]) -> set[tuple]:
    return {(row["path"], row["size"], row["version"]) for row in inputs}


@dataclass
class OutputFolder:
    """One output partition folder on a filesystem."""

    fs: object
    path: str

    def __post_init__(self) -> None:
        self.fs = resilient(self.fs)

    @classmethod
    def under(cls, fs, root: str, folder: str) -> OutputFolder:
        """The partition `folder` (relative; '' for `root` itself) of the output at `root`."""
        return cls(fs, join(root, folder) if folder else root.rstrip("/"))

    def read_marker(self) -> Marker | None:
        data = self._read(MARKER)
        return None if data is None else Marker.from_json(data)

    def read_journal(self) -> dict | None:
        data = self._read(JOURNAL)
        return None if data is None else json.loads(data)

    def current(self) -> Marker | None:
        """The version readers get: the marker's, or while a commit runs before its new marker, the one it replaces."""
        marker = self.read_marker()
        if marker is None:
            journal = self.read_journal()
            previous = journal and journal.get("previous")
            marker = Marker.from_document(previous) if previous else self.read_marker()  # again: it may have ended
        return marker

    def _read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self.path}/{name}")
        except FileNotFoundError:
            return None

    def data_files(self) -> list[str]:
        """Names of every Parquet file in the folder itself (not below it)."""
        if not self.fs.exists(self.path):
            return []
        return sorted(
            name
            for name in (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
            if name.endswith(".parquet") and self.fs.isfile(f"{self.path}/{name}")
        )

    def recover(self) -> None:
        """Finish a killed commit that wrote its new marker; roll back one that did not, to the version it replaced."""
        journal = self.read_journal()
        if journal is None:
            return
        marker = self.read_marker()
        previous = journal.get("previous")
        if marker is None and previous is not None:
            marker = Marker.from_document(previous)
            self._write(MARKER, marker.to_json())
            outcome = "rolled back to the previous version"
        else:
            outcome = "finished" if marker else "rolled back"
        kept = set(marker.files) if marker else set()
        for name in {*journal["incoming"], *journal["replaced"]} - kept:
            if self.fs.exists(f"{self.path}/{name}"):
                self.fs.rm(f"{self.path}/{name}")
        self.fs.rm(f"{self.path}/{JOURNAL}")
        logger.warning("%s: a commit that was interrupted is %s", self.path, outcome)

    def commit(self, staged: list[str], marker: Marker) -> Marker:
        """Replace the partition's previous version by the staged files (full paths); returns the marker written."""
        self.recover()
        previous = self.read_marker()
        replaced = previous.files if previous else []
        names = [f"part-{marker.run}-{index:05d}.parquet" for index in range(len(staged))]
        marker = Marker(**{**asdict(marker), "files": names, "committed_at": _now()})
        self.fs.makedirs(self.path, exist_ok=True)
        foreign = sorted(set(self.data_files()) - set(replaced))
        if foreign:
            logger.warning("%s holds %d files fimood did not write; left alone: %s", self.path, len(foreign), foreign)
        journal = {"incoming": names, "replaced": replaced, "previous": asdict(previous) if previous else None}
        self._write(JOURNAL, json.dumps(journal).encode())  # 1.
        if previous is not None:
            self.fs.rm(f"{self.path}/{MARKER}")  # 2.
        for source, name in zip(staged, names, strict=True):
            self.fs.mv(source, f"{self.path}/{name}")  # 3.
        self._write(MARKER, marker.to_json())  # 4.
        for name in replaced:  # 5.
            if name not in names and self.fs.exists(f"{self.path}/{name}"):
                self.fs.rm(f"{self.path}/{name}")
        self.fs.rm(f"{self.path}/{JOURNAL}")
        return marker

    def _write(self, name: str, data: bytes) -> None:
        write_file(self.fs, f"{self.path}/{name}", data)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _current_versions(url: str, storage_options: StorageOptions) -> dict[str, tuple[OutputFolder, Marker]]:
    fs, root = filesystem(url, storage_options)
    fs, root = resilient(fs), root.rstrip("/")
    if not fs.exists(root):
        return {}
    found = {}
    for path in sorted(fs.find(root)):
        parent, _, name = path[len(root) :].strip("/").rpartition("/")
        if name in (MARKER, JOURNAL) and not parent.startswith(STAGING) and parent not in found:
            folder = OutputFolder.under(fs, root, parent)
            marker = folder.current()
            if marker is not None:
                found[parent] = (folder, marker)
    return found


def read_committed(url: str, storage_options: StorageOptions = None, columns: list[str] | None = None) -> pa.Table:
    """Every committed row under an output URL, from the files its markers list (and only those).

    A partition being committed is read as its previous version, or its new one if the commit ends
    while it is read; never a mix. Hive-style folder names (`date=2026-11-26`) become string
    columns; a partition lacking a key gets nulls in it. Partitions never committed are left out.
    """
    tables = []
    for name, (folder, marker) in _current_versions(url, storage_options).items():
        keys = dict(part.split("=", 1) for part in name.split("/") if "=" in part)
        for table in _read_version(folder, marker, columns):
            for key, value in keys.items():
                table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
            tables.append(table)
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def _read_version(folder: OutputFolder, marker: Marker, columns: list[str] | None, attempts: int = 5) -> list[pa.Table]:
    """The files of one version; if a commit removed them meanwhile, the version that replaced them."""
    for _ in range(attempts):
        try:
            return [_read_parquet(folder.fs, f"{folder.path}/{name}", columns) for name in marker.files]
        except FileNotFoundError:
            marker = folder.current()
            if marker is None:
                return []
    raise RuntimeError(f"{folder.path}: its version changed {attempts} times while it was read; read it again")


def _read_parquet(fs, path: str, columns: list[str] | None) -> pa.Table:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


@dataclass
class Staging:
    """A run's staging folder, `<output>/_staging/<run>/`, kept alive by a heartbeat file.

    Staging left by a dead run (its heartbeat older than STALE_AFTER_SECONDS) is removed by the
    next run on the same output; a live run's is left alone, so runs on different partitions can
    share one output.
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
