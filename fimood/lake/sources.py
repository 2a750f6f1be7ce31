"""Input shards on any fsspec URL: the partitions of a lake, and the read units a scoring pass reads.

A shard is one Parquet file (an image column of encoded bytes or fixed-shape arrays) or one image
file. A partition is one folder of the lake that holds shards, at any depth, named or not
(`date=2026-11-26/`, `date=1/hour=2/`, `raw/cam-1/`): its output is the same folder under the
output URL, so no two input folders ever share one. Each row gets a stable id: the id column when
there is one, else `<shard path>#<row index>` (for image files, the path itself).

Everything here is proportional to what is selected, never to the lake: folders are listed level by
level down the `--partitions` globs, and each selected folder in parallel; footers are read by
whatever `plan_reads` is given (Ray tasks, in the passes); a read unit is bounded in rows and in
stored bytes, and is read as a stream of small blocks, so a task's memory does not grow with it.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from fimood.storage import StorageOptions, filesystem, resilient, resumable, retrying, transient

FORMATS = {"parquet": (".parquet",), "images": (".png", ".jpg", ".jpeg")}
# What a filesystem reports that changes when a file is rewritten, in order of preference.
VERSION_FIELDS = ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "created")
ROWS_PER_READ = 4096  # a read unit holds up to this many rows ...
BYTES_PER_READ = 64 * 2**20  # ... or this many stored bytes: small files are coalesced, large ones split
ROWS_PER_BLOCK = 256  # rows a read task holds decoded at once, whatever its unit's size
READ_BUFFER_BYTES = 4 * 2**20  # a Parquet column chunk is streamed in pieces this large, never read whole
LISTING_THREADS = 16  # folders are listed, and footers read, in parallel: on object stores each is a round trip
FOOTER_BYTES = 64 * 2**10  # a Parquet footer is read with one request of this many bytes (more when larger)


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
        patterns: keep only folders matching one of these globs, one segment per folder level
            (`date=2026-11-*`, `*/hour=0?`), and what lies below them; empty keeps every folder. Only
            the levels a glob names are listed, so a narrow selection of a large lake lists little.
            Names starting with `_` or `.` are never read.
    """
    check_format(input_format)
    for pattern in filter(None, (pattern.strip("/") for pattern in patterns)):
        if any(segment in ("", ".", "..") for segment in pattern.split("/")):
            raise ValueError(f"--partitions {pattern!r}: a segment is empty, '.' or '..'; name folders below the URL")
    fs, root = filesystem(url, storage_options)
    fs, root = resilient(fs), root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"no such file or folder: {url}")
    fs.invalidate_cache()  # a long-lived process lists what is there now, not what its filesystem saw before
    if fs.isdir(root):
        folders, found = _selected_folders(fs, root, [pattern.strip("/") for pattern in patterns])
        with ThreadPoolExecutor(LISTING_THREADS) as pool:
            for below in pool.map(lambda folder: fs.find(folder, detail=True), folders):
                found.update(below)
    else:
        found = {root: fs.info(root)}
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


def _selected_folders(fs, root: str, patterns: list[str]) -> tuple[list[str], dict[str, dict]]:
    """The folders below which every selected shard lies, found by walking down the globs' segments (a
    segment without wildcards is taken as it is, without listing), and the root's own files when every
    folder is selected."""
    if not patterns or "" in patterns:
        patterns, files = ["*"], {info["name"]: info for info in fs.ls(root, detail=True) if info["type"] == "file"}
    else:
        files = {}
    matched: set[str] = set()
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        for segments in {tuple(pattern.split("/")) for pattern in patterns}:
            level = [root]
            for segment in segments:
                if not glob.has_magic(segment):
                    level = [f"{folder}/{segment}" for folder in level]
                    continue
                level = [
                    info["name"].rstrip("/")
                    for listing in pool.map(lambda folder: _folders_in(fs, folder), level)
                    for info in listing
                    if fnmatch.fnmatchcase(info["name"].rstrip("/").rsplit("/", 1)[-1], segment)
                ]
            matched.update(level)
    return sorted(matched), files


def _folders_in(fs, folder: str) -> list[dict]:
    """The folders directly in `folder` that may hold shards (none when it does not exist; never hidden ones)."""
    try:
        listing = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    names = [(info, info["name"].rstrip("/").rsplit("/", 1)[-1]) for info in listing if info["type"] == "directory"]
    return [info for info, name in names if not name.startswith((".", "_"))]


def list_shards(url: str, input_format: str = "parquet", storage_options: StorageOptions = None) -> list[Shard]:
    """Every shard below `url` (or `url` itself), in path order."""
    return sorted(
        (shard for partition in list_partitions(url, input_format, storage_options) for shard in partition.shards),
        key=lambda shard: shard.path,
    )


def _selected(folder: str, patterns: Sequence[str]) -> bool:
    """True when the folder, or a folder above it, matches one of the globs, segment by segment."""
    parts = folder.split("/") if folder else []
    for pattern in patterns:
        segments = [segment for segment in pattern.strip("/").split("/") if segment]
        if len(segments) <= len(parts) and all(map(fnmatch.fnmatchcase, parts, segments)):
            return True
    return False


def _version(info: dict) -> str:
    for name in VERSION_FIELDS:
        if info.get(name) is not None:
            return f"{name}:{info[name]}"
    return ""


@dataclass(frozen=True)
class Piece:
    """Some rows of one shard: row groups of a Parquet file (from its row `first_row`), or one image file."""

    partition: int  # index into the run's partitions
    path: str
    rows: int
    row_groups: tuple[int, ...] = ()  # Parquet only
    first_row: int = 0  # index of the piece's first row in its file, for derived ids


@dataclass(frozen=True)
class ReadUnit:
    """What one read task reads: pieces of shards, at most `ROWS_PER_READ` rows or `BYTES_PER_READ` bytes
    (a row group larger than that is a unit of its own, read as a stream all the same)."""

    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(piece.rows for piece in self.pieces)

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(piece.path for piece in self.pieces))


@dataclass(frozen=True)
class ReadSpec:
    """Where and how rows are read from shards."""

    url: str  # the data URL the shards were listed from
    input_format: str = "parquet"
    image_column: str = "image"
    id_column: str = "id"  # when a shard has no such column, ids are derived: `<shard path>#<row>`
    storage_options: StorageOptions = field(default=None, hash=False)

    def filesystem(self):
        return resilient(filesystem(self.url, self.storage_options)[0])


@dataclass(frozen=True)
class Footer:
    """What planning needs of a Parquet footer: the columns, and each row group's rows and stored bytes."""

    columns: tuple[str, ...]
    group_rows: tuple[int, ...]
    group_bytes: tuple[int, ...]


Footers = Callable[[list[str], ReadSpec], list["Footer | str"]]  # shard paths → each footer, or why it is unreadable


@dataclass(frozen=True)
class ReadPlan:
    """What a pass will read: the units, each partition's row count, and the shards that cannot be read."""

    units: list[ReadUnit]
    rows: list[int]  # per partition, from the readable shards
    unreadable: dict[str, str] = field(default_factory=dict)  # shard path → why it cannot be read

    def unreadable_in(self, partition: Partition) -> list[str]:
        return [shard.path for shard in partition.shards if shard.path in self.unreadable]


def read_footers(paths: list[str], spec: ReadSpec) -> list[Footer | str]:
    """The footers of these Parquet shards, read in parallel threads (the passes run this in Ray tasks)."""
    fs = spec.filesystem()
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        return list(pool.map(lambda path: retrying(lambda: _footer(fs, path), f"read the footer of {path}"), paths))


def _footer(fs, path: str) -> Footer | str:
    """The shard's footer, or why it cannot be read (a short, stable reason)."""
    try:
        with fs.open(path, "rb", block_size=FOOTER_BYTES, cache_type="readahead") as handle:
            metadata = pq.ParquetFile(handle).metadata
    except FileNotFoundError:
        return "vanished since it was listed"
    except (pa.ArrowInvalid, OSError) as error:
        if isinstance(error, PermissionError) or transient(error):
            raise
        return "not a readable Parquet file (" + str(error).split(".")[0].strip() + ")"
    groups = [metadata.row_group(group) for group in range(metadata.num_row_groups)]
    return Footer(
        tuple(metadata.schema.to_arrow_schema().names),
        tuple(group.num_rows for group in groups),
        tuple(sum(group.column(i).total_compressed_size for i in range(group.num_columns)) for group in groups),
    )


def plan_reads(partitions: list[Partition], spec: ReadSpec, footers: Footers = read_footers) -> ReadPlan:
    """The read units of every partition and each partition's row count (from the Parquet footers).

    Column names are checked here, before any work, so a wrong `image_column` fails in one line. A shard
    whose footer cannot be read (not Parquet, truncated) is left out and named in `unreadable`.
    """
    units = _Packer()
    if spec.input_format == "images":
        for index, partition in enumerate(partitions):
            for shard in partition.shards:
                units.add(Piece(index, shard.path, 1), shard.size)
        return ReadPlan(units.done(), [len(partition.shards) for partition in partitions])
    jobs = [(index, shard.path) for index, partition in enumerate(partitions) for shard in partition.shards]
    read = footers([path for _, path in jobs], spec) if jobs else []
    rows, unreadable = [0] * len(partitions), {}
    for (index, path), footer in zip(jobs, read, strict=True):
        if isinstance(footer, str):
            unreadable[path] = footer
            continue
        _check_columns(path, footer.columns, spec)
        rows[index] += sum(footer.group_rows)
        first_row = 0
        for group, (group_rows, group_bytes) in enumerate(zip(footer.group_rows, footer.group_bytes, strict=True)):
            units.add(Piece(index, path, group_rows, (group,), first_row), group_bytes)
            first_row += group_rows
    return ReadPlan(units.done(), rows, unreadable)


class _Packer:
    """Pieces packed into read units in order, a unit closed before it would pass a bound; consecutive row
    groups of one file become one piece."""

    def __init__(self):
        self.units: list[ReadUnit] = []
        self.pieces: list[Piece] = []
        self.rows = self.bytes = 0

    def add(self, piece: Piece, size: int) -> None:
        if self.pieces and (self.rows + piece.rows > ROWS_PER_READ or self.bytes + size > BYTES_PER_READ):
            self._close()
        last = self.pieces[-1] if self.pieces else None
        if last and last.path == piece.path and piece.row_groups and last.first_row + last.rows == piece.first_row:
            self.pieces[-1] = Piece(
                last.partition, last.path, last.rows + piece.rows, last.row_groups + piece.row_groups, last.first_row
            )
        else:
            self.pieces.append(piece)
        self.rows, self.bytes = self.rows + piece.rows, self.bytes + size

    def _close(self) -> None:
        self.units.append(ReadUnit(tuple(self.pieces)))
        self.pieces, self.rows, self.bytes = [], 0, 0

    def done(self) -> list[ReadUnit]:
        if self.pieces:
            self._close()
        return self.units


def _check_columns(path: str, columns: Sequence[str], spec: ReadSpec) -> None:
    if spec.image_column not in columns:
        raise ValueError(f"{path}: expected an image column {spec.image_column!r}, found {list(columns)}")
    if spec.id_column != "id" and spec.id_column not in columns:
        raise ValueError(f"{path}: expected an id column {spec.id_column!r}, found {list(columns)}")


@dataclass(frozen=True)
class RawBlock:
    """Up to `ROWS_PER_BLOCK` rows of one piece, as read: ids, raw image cells (encoded bytes or pixel
    arrays), and the error of a row whose file could not be read at all (else None)."""

    partition: int
    ids: list[str]
    cells: list
    errors: list[str | None]


def read_blocks(unit: ReadUnit, spec: ReadSpec) -> Iterator[RawBlock]:
    """The rows of one read unit, in file order, as blocks; a stream cut short by the store (a dropped
    connection, throttling) is read again from the first row not yet yielded."""
    fs = spec.filesystem()
    if spec.input_format == "images":
        paths = [(piece.partition, piece.path) for piece in unit.pieces]
        yield from resumable(lambda done: _image_blocks(fs, paths[done:]), lambda block: len(block.ids), "read images")
        return
    for piece in unit.pieces:
        yield from resumable(
            lambda done, piece=piece: _parquet_blocks(fs, piece, spec, done), lambda b: len(b.ids), f"read {piece.path}"
        )


def _image_blocks(fs, paths: list[tuple[int, str]]) -> Iterator[RawBlock]:
    """Image files fetched concurrently, a block at a time (`cat` of many paths: parallel requests on
    object stores); a file that cannot be read is an error row, one the store did not answer for is retried."""
    for start in range(0, len(paths), ROWS_PER_BLOCK):
        chunk = paths[start : start + ROWS_PER_BLOCK]
        for partition in dict.fromkeys(partition for partition, _ in chunk):
            names = [path for index, path in chunk if index == partition]
            fetched = fs.cat_ranges(names, [0] * len(names), [None] * len(names), on_error="return")  # no globbing
            cells, errors = [], []
            for value in fetched:
                if isinstance(value, BaseException):
                    if transient(value):
                        raise value
                    cells.append(None)
                    errors.append(f"image file cannot be read ({type(value).__name__})")
                else:
                    cells.append(value)
                    errors.append(None)
            yield RawBlock(partition, names, cells, errors)


def _parquet_blocks(fs, piece: Piece, spec: ReadSpec, skip: int) -> Iterator[RawBlock]:
    """A piece's rows after its first `skip`, streamed `ROWS_PER_BLOCK` at a time."""
    with fs.open(piece.path, "rb") as handle:
        parquet = pq.ParquetFile(handle, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)  # pre-buffering reads it all
        names = parquet.schema_arrow.names
        with_ids = spec.id_column in names
        columns = [spec.image_column, *([spec.id_column] if with_ids else [])]
        row = piece.first_row
        for batch in parquet.iter_batches(ROWS_PER_BLOCK, list(piece.row_groups), columns, use_threads=False):
            first = row
            row += batch.num_rows
            if row - piece.first_row <= skip:
                continue
            batch = batch.slice(max(0, skip - (first - piece.first_row)))
            first = row - batch.num_rows
            if with_ids:
                ids = [str(value) for value in batch.column(spec.id_column).to_pylist()]
            else:
                ids = [f"{piece.path}#{index}" for index in range(first, row)]
            yield RawBlock(piece.partition, ids, batch.column(spec.image_column).to_pylist(), [None] * len(ids))
