"""Input shards on any fsspec URL: the partitions of a lake, and the read units a scoring pass reads.

A shard is one Parquet file (an image column of encoded bytes or fixed-shape arrays) or one image
file. A partition is one folder of the lake that holds shards, at any depth, named or not
(`date=2026-11-26/`, `date=1/hour=2/`, `raw/cam-1/`): its output is the same folder under the
output URL, so no two input folders ever share one. Each row gets a stable id: the id column when
there is one, else `<shard path>#<row index>` (for image files, the path itself).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from fimood.storage import StorageOptions, filesystem, resilient

FORMATS = {"parquet": (".parquet",), "images": (".png", ".jpg", ".jpeg")}
# What a filesystem reports that changes when a file is rewritten, in order of preference.
VERSION_FIELDS = ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "created")
ROWS_PER_READ = 4096  # a read unit is a Parquet file's row groups up to about this many rows, or this many images
LISTING_THREADS = 16  # Parquet footers are read in parallel: on object stores each is a round trip


@dataclass(frozen=True)
class Shard:
    """One input file, as the listing saw it."""

    path: str  # inside the filesystem, without the protocol
    size: int
    version: str  # ETag, generation or mtime: whatever the filesystem gives, so a rewrite is noticed

    def as_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "version": self.version}


@dataclass(frozen=True)
class Partition:
    """A folder of the lake that holds shards; `folder` is relative to the data URL ('' for the URL itself)."""

    folder: str
    shards: tuple[Shard, ...]


def check_format(input_format: str) -> str:
    if input_format not in FORMATS:
        raise ValueError(f"input_format must be one of {sorted(FORMATS)}, got {input_format!r}")
    return input_format


def list_partitions(
    url: str,
    input_format: str = "parquet",
    storage_options: StorageOptions = None,
    patterns: Sequence[str] = (),
) -> list[Partition]:
    """Every partition below `url` (or `url` itself, a single file), sorted by folder.

    Args:
        patterns: keep only folders matching one of these globs (`date=2026-11-*`), or lying below
            one that does; empty keeps every folder. Names starting with `_` or `.` are never read.
    """
    check_format(input_format)
    fs, root = filesystem(url, storage_options)
    fs, root = resilient(fs), root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"no such file or folder: {url}")
    found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    by_folder: dict[str, list[Shard]] = {}
    for path, info in sorted(found.items()):
        relative = path[len(root) :].strip("/").split("/") if path != root else [path.rsplit("/", 1)[-1]]
        if not path.lower().endswith(FORMATS[input_format]) or any(part.startswith((".", "_")) for part in relative):
            continue
        if any(part in ("", ".", "..") for part in relative):
            raise ValueError(f"{path}: a path segment is empty, '.' or '..'; it cannot be mirrored into the output")
        folder = "/".join(relative[:-1])
        if patterns and not _selected(folder, patterns):
            continue
        by_folder.setdefault(folder, []).append(
            Shard(path=path, size=int(info.get("size") or 0), version=_version(info))
        )
    if not by_folder:
        selection = f" in partitions matching {list(patterns)}" if patterns else ""
        raise FileNotFoundError(f"no {input_format} shards ({', '.join(FORMATS[input_format])}) under {url}{selection}")
    return [Partition(folder, tuple(shards)) for folder, shards in sorted(by_folder.items())]


def list_shards(url: str, input_format: str = "parquet", storage_options: StorageOptions = None) -> list[Shard]:
    """Every shard below `url` (or `url` itself), in path order."""
    return sorted(
        (shard for partition in list_partitions(url, input_format, storage_options) for shard in partition.shards),
        key=lambda shard: shard.path,
    )


def _selected(folder: str, patterns: Sequence[str]) -> bool:
    """True when the folder, or a folder above it, matches one of the globs."""
    parts = folder.split("/") if folder else []
    prefixes = ["/".join(parts[:depth]) for depth in range(len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern.strip("/")) for prefix in prefixes for pattern in patterns)


def _version(info: dict) -> str:
    for name in VERSION_FIELDS:
        if info.get(name) is not None:
            return f"{name}:{info[name]}"
    return ""


@dataclass(frozen=True)
class ReadUnit:
    """What one read task reads: some row groups of a Parquet file, or some image files."""

    partition: int  # index into the run's partitions
    paths: tuple[str, ...]  # one Parquet file, or image files
    row_groups: tuple[int, ...] = ()  # Parquet only
    first_row: int = 0  # index of the unit's first row in its file, for derived ids
    rows: int = 0


@dataclass(frozen=True)
class ReadSpec:
    """Where and how rows are read from shards."""

    url: str  # the data URL the shards were listed from
    input_format: str = "parquet"
    image_column: str = "image"
    id_column: str = "id"  # when a shard has no such column, ids are derived: `<shard path>#<row>`
    storage_options: StorageOptions = field(default=None, hash=False)


@dataclass(frozen=True)
class ReadPlan:
    """What a pass will read: the units, each partition's row count, and the shards that cannot be read."""

    units: list[ReadUnit]
    rows: list[int]  # per partition, from the readable shards
    unreadable: dict[str, str] = field(default_factory=dict)  # shard path → why it cannot be read

    def unreadable_in(self, partition: Partition) -> list[str]:
        return [shard.path for shard in partition.shards if shard.path in self.unreadable]


def plan_reads(partitions: list[Partition], spec: ReadSpec) -> ReadPlan:
    """The read units of every partition and each partition's row count (from the Parquet footers).

    Column names are checked here, on the driver, so a wrong `image_column` fails before any work. A
    shard whose footer cannot be read (not Parquet, truncated) is left out and named in `unreadable`.
    """
    if spec.input_format == "images":
        units = [
            ReadUnit(index, tuple(s.path for s in chunk), rows=len(chunk))
            for index, partition in enumerate(partitions)
            for chunk in _chunks(partition.shards, ROWS_PER_READ)
        ]
        return ReadPlan(units, [len(partition.shards) for partition in partitions])
    fs = resilient(filesystem(spec.url, spec.storage_options)[0])
    jobs = [(index, shard) for index, partition in enumerate(partitions) for shard in partition.shards]
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        footers = list(pool.map(lambda job: _footer(fs, job[1].path), jobs))
    units, rows, unreadable = [], [0] * len(partitions), {}
    for (index, shard), metadata in zip(jobs, footers, strict=True):
        if isinstance(metadata, str):
            unreadable[shard.path] = metadata
            continue
        _check_columns(shard.path, metadata.schema.to_arrow_schema().names, spec)
        rows[index] += metadata.num_rows
        first_row, groups, group_rows = 0, [], 0
        for group in range(metadata.num_row_groups):
            groups.append(group)
            group_rows += metadata.row_group(group).num_rows
            if group_rows >= ROWS_PER_READ or group == metadata.num_row_groups - 1:
                units.append(ReadUnit(index, (shard.path,), tuple(groups), first_row, group_rows))
                first_row, groups, group_rows = first_row + group_rows, [], 0
    return ReadPlan(units, rows, unreadable)


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _footer(fs, path: str) -> pq.FileMetaData | str:
    """The shard's Parquet footer, or why it cannot be read (a short, stable reason)."""
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata
    except (pa.ArrowInvalid, OSError) as error:
        if isinstance(error, FileNotFoundError | PermissionError):
            raise
        return "not a readable Parquet file (" + str(error).split(".")[0].strip() + ")"


def _check_columns(path: str, columns: list[str], spec: ReadSpec) -> None:
    if spec.image_column not in columns:
        raise ValueError(f"{path}: expected an image column {spec.image_column!r}, found {columns}")
    if spec.id_column != "id" and spec.id_column not in columns:
        raise ValueError(f"{path}: expected an id column {spec.id_column!r}, found {columns}")


def read_unit(unit: ReadUnit, spec: ReadSpec) -> tuple[list[str], list]:
    """The ids and raw image cells (encoded bytes or pixel arrays) of one read unit, in file order."""
    fs = resilient(filesystem(spec.url, spec.storage_options)[0])
    if spec.input_format == "images":
        return list(unit.paths), [fs.cat_file(path) for path in unit.paths]
    (path,) = unit.paths
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        columns = [spec.image_column, *([spec.id_column] if spec.id_column in names else [])]
        table = parquet.read_row_groups(list(unit.row_groups), columns=columns)
    if spec.id_column in names:
        ids = [str(value) for value in table.column(spec.id_column).to_pylist()]
    else:
        ids = [f"{path}#{row}" for row in range(unit.first_row, unit.first_row + table.num_rows)]
    return ids, table.column(spec.image_column).to_pylist()
