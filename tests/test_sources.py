"""Planning and reading a lake: work proportional to the selection, read units bounded in rows and bytes,
memory bounded in a task, and streams the store cuts short or throttles read again without a row lost
or repeated."""

from __future__ import annotations

import errno
import http.client
import io

import aiohttp
import botocore.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data import DataContext

from fimood.lake import sources
from fimood.lake.images import encode_png
from fimood.lake.sources import ReadSpec, list_partitions, plan_reads, read_blocks
from fimood.passes.runtime import start_ray
from fimood.storage import RETRY_SECONDS_ENV, StorageUnavailable, filesystem, transient


class Faults:
    """What the watched filesystems saw, and the faults they are to make: throttle the next `throttled`
    opens (S3's SlowDown, as s3fs raises it), cut the next `cuts` opened streams after `cut_after` bytes."""

    def __init__(self):
        self.listed, self.opened = [], []
        self.throttled = self.cuts = self.cut_after = self.largest_read = 0


class Watched:
    """A filesystem that records its listings and opens, and fails as an object store does when told to."""

    def __init__(self, fs, faults: Faults):
        self.fs, self.faults = fs, faults

    def ls(self, path, **kwargs):
        self.faults.listed.append(("ls", path))
        return self.fs.ls(path, **kwargs)

    def find(self, path, **kwargs):
        self.faults.listed.append(("find", path))
        return self.fs.find(path, **kwargs)

    def open(self, path, mode="rb", **kwargs):
        faults = self.faults
        faults.opened.append(path)
        if faults.throttled:
            faults.throttled -= 1
            raise OSError(errno.EBUSY, "Please reduce your request rate (SlowDown)")
        cut, faults.cuts = faults.cuts > 0, max(0, faults.cuts - 1)
        return StoreStream(self.fs.cat_file(path), faults, cut)

    def __getattr__(self, name):
        return getattr(self.fs, name)


class StoreStream(io.BytesIO):
    """A file read from the store: its largest read is recorded, and a stream to be cut breaks, as an
    interrupted HTTP body does, once `faults.cut_after` bytes have been read from it."""

    def __init__(self, data: bytes, faults: Faults, cut: bool):
        super().__init__(data)
        self.faults, self.left = faults, faults.cut_after if cut else float("inf")

    def read(self, size=-1):
        size = len(self.getbuffer()) if size is None or size < 0 else size
        self.faults.largest_read = max(self.faults.largest_read, size)
        if size > self.left:
            raise http.client.IncompleteRead(b"", size)
        self.left -= size
        return super().read(size)


@pytest.fixture
def faults(monkeypatch) -> Faults:
    """Every filesystem fimood.lake.sources opens, watched, with the faults the test asks for."""
    faults = Faults()
    monkeypatch.setattr(sources, "filesystem", lambda url, options=None: _watched(url, options, faults))
    monkeypatch.setenv(RETRY_SECONDS_ENV, "30")
    return faults


def _watched(url, storage_options, faults):
    fs, path = filesystem(url, storage_options)
    return Watched(fs, faults), path


def write_shard(path, rows: int, rows_per_group: int | None = None, first: int = 0, ids: bool = True) -> None:
    rng = np.random.default_rng(first)
    images = rng.integers(0, 256, (rows, 1, 4, 4), dtype=np.uint8)
    table = pa.table({"image": pa.array([encode_png(image) for image in images], pa.binary())})
    if ids:
        table = table.append_column("id", pa.array([f"row-{first + i}" for i in range(rows)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=rows_per_group or rows)


def test_a_glob_lists_only_the_folders_it_names(tmp_path, faults):
    for day in range(1, 31):
        for hour in (0, 12):
            write_shard(tmp_path / f"date=2026-11-{day:02d}" / f"hour={hour:02d}" / "part-0.parquet", 2)
    write_shard(tmp_path / "date=2026-11-03" / "extra" / "hour=12" / "part-0.parquet", 2)

    selected = list_partitions(str(tmp_path), patterns=["date=2026-11-0[1-3]/hour=12"])

    assert [p.folder for p in selected] == [f"date=2026-11-{day:02d}/hour=12" for day in (1, 2, 3)]
    listed = faults.listed
    assert listed.count(("ls", str(tmp_path))) == 1 and len([call for call in listed if call[0] == "ls"]) == 1
    assert sorted(path for kind, path in listed if kind == "find") == [
        str(tmp_path / f"date=2026-11-{day:02d}" / "hour=12") for day in (1, 2, 3)
    ]


def test_a_glob_matches_one_folder_level_per_segment_and_selects_what_lies_below(tmp_path, faults):
    for folder in ("a/hour=1", "a/deeper/hour=1", "b/hour=1/minute=5", "b/hour=2", ".staging/hour=1"):
        write_shard(tmp_path / folder / "part-0.parquet", 1)

    assert [p.folder for p in list_partitions(str(tmp_path), patterns=["*/hour=1"])] == [
        "a/hour=1",
        "b/hour=1/minute=5",
    ]
    assert not any(".staging" in path for _, path in faults.listed)  # a hidden folder is never walked
    assert len(list_partitions(str(tmp_path))) == 4
    for wrong in ("../elsewhere", "a//hour=1", "./a"):
        with pytest.raises(ValueError, match="a segment is empty"):
            list_partitions(str(tmp_path), patterns=[wrong])


def test_a_shard_that_vanished_after_the_listing_is_left_out_as_unreadable(tmp_path):
    for name in ("part-0", "part-1"):
        write_shard(tmp_path / "date=1" / f"{name}.parquet", 3, first=int(name[-1]) * 3)
    listed = list_partitions(str(tmp_path))
    (tmp_path / "date=1" / "part-1.parquet").unlink()

    plan = plan_reads(listed, ReadSpec(str(tmp_path)))

    assert plan.rows == [3] and list(plan.unreadable.values()) == ["vanished since it was listed"]


def test_small_files_are_coalesced_into_read_units_bounded_in_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "ROWS_PER_READ", 100)
    for day in range(50):
        write_shard(tmp_path / f"day={day:02d}" / "part-0.parquet", 10, first=10 * day)
    partitions = list_partitions(str(tmp_path))

    plan = plan_reads(partitions, ReadSpec(str(tmp_path)))

    assert [unit.rows for unit in plan.units] == [100] * 5 and plan.rows == [10] * 50
    assert [len(unit.pieces) for unit in plan.units] == [10] * 5
    ids = [
        row_id for unit in plan.units for block in read_blocks(unit, ReadSpec(str(tmp_path))) for row_id in block.ids
    ]
    assert ids == [f"row-{i}" for i in range(500)]


def test_a_file_larger_than_a_unit_is_split_between_its_row_groups_by_stored_bytes(tmp_path, monkeypatch):
    write_shard(tmp_path / "part-0.parquet", 1000, rows_per_group=100)
    group = pq.ParquetFile(tmp_path / "part-0.parquet").metadata.row_group(0)
    group_bytes = sum(group.column(i).total_compressed_size for i in range(group.num_columns))
    monkeypatch.setattr(sources, "BYTES_PER_READ", int(2.5 * group_bytes))

    plan = plan_reads(list_partitions(str(tmp_path)), ReadSpec(str(tmp_path)))

    assert [unit.pieces[0].row_groups for unit in plan.units] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert [unit.pieces[0].first_row for unit in plan.units] == [0, 200, 400, 600, 800]


def test_a_row_group_larger_than_a_unit_is_read_as_a_stream_of_small_blocks(tmp_path, faults, monkeypatch):
    rng = np.random.default_rng(0)
    cells = pa.array([rng.bytes(1000) for _ in range(3000)], pa.binary())  # one row group of 3 MB, ids derived
    pq.write_table(
        pa.table({"image": cells}),
        tmp_path / "part-0.parquet",
        data_page_size=2**16,
        write_batch_size=64,
        use_dictionary=False,
    )
    monkeypatch.setattr(sources, "ROWS_PER_READ", 500)
    monkeypatch.setattr(sources, "READ_BUFFER_BYTES", 2**16)
    spec = ReadSpec(str(tmp_path))

    (unit,) = plan_reads(list_partitions(str(tmp_path)), spec).units
    faults.largest_read = 0
    blocks = list(read_blocks(unit, spec))

    assert max(len(block.ids) for block in blocks) == sources.ROWS_PER_BLOCK
    assert faults.largest_read <= 2**17  # a page at a time, never the row group's 3 MB
    assert [row_id.rsplit("#")[-1] for block in blocks for row_id in block.ids] == [str(i) for i in range(3000)]


def test_a_stream_cut_short_is_read_again_from_the_first_row_not_yet_yielded(tmp_path, faults, monkeypatch):
    monkeypatch.setattr(sources, "READ_BUFFER_BYTES", 4096)  # streamed page by page, as a file larger than it is
    rng = np.random.default_rng(0)
    cells = pa.array([rng.bytes(1000) for _ in range(2000)], pa.binary())  # raw cells: read, not decoded here
    pq.write_table(
        pa.table({"id": [f"row-{i}" for i in range(2000)], "image": cells}), tmp_path / "p.parquet", row_group_size=250
    )
    spec = ReadSpec(str(tmp_path))
    (unit,) = plan_reads(list_partitions(str(tmp_path)), spec).units
    size = (tmp_path / "p.parquet").stat().st_size

    faults.opened, faults.cuts = [], 1
    faults.cut_after = 2**16 + size // 2  # past the footer (read first, 64 KiB), halfway through the rows
    ids, before_the_cut = [], None
    for block in read_blocks(unit, spec):
        if len(faults.opened) == 2 and before_the_cut is None:
            before_the_cut = len(ids)
        ids += block.ids

    assert ids == [f"row-{i}" for i in range(2000)]  # none lost, none twice
    assert faults.opened == [str(tmp_path / "p.parquet")] * 2 and faults.cuts == 0
    assert 0 < before_the_cut < 2000  # cut in the middle: rows had been yielded


def test_a_throttled_read_waits_and_tries_again(tmp_path, faults):
    write_shard(tmp_path / "part-0.parquet", 10)
    spec = ReadSpec(str(tmp_path))
    (unit,) = plan_reads(list_partitions(str(tmp_path)), spec).units

    faults.opened, faults.throttled = [], 2
    assert [row_id for block in read_blocks(unit, spec) for row_id in block.ids] == [f"row-{i}" for i in range(10)]
    assert len(faults.opened) == 3


def test_a_store_that_stays_away_stops_the_read_in_one_clear_error(tmp_path, faults, monkeypatch):
    write_shard(tmp_path / "part-0.parquet", 10)
    spec = ReadSpec(str(tmp_path))
    (unit,) = plan_reads(list_partitions(str(tmp_path)), spec).units
    monkeypatch.setenv(RETRY_SECONDS_ENV, "2")

    faults.throttled = 100
    with pytest.raises(StorageUnavailable, match="did not answer for 2 s"):
        list(read_blocks(unit, spec))


def test_an_error_that_is_not_the_stores_is_not_retried(tmp_path, faults):
    (tmp_path / "part-0.parquet").write_bytes(b"not parquet at all")
    plan = plan_reads(list_partitions(str(tmp_path)), ReadSpec(str(tmp_path)))
    assert not plan.units and "not a readable Parquet file" in plan.unreadable[str(tmp_path / "part-0.parquet")]
    assert len(faults.opened) == 1


def test_image_files_are_fetched_a_block_at_a_time_and_one_that_vanished_is_an_error_row(tmp_path, faults):
    for i in range(600):
        (tmp_path / f"{i:04d}.png").write_bytes(encode_png(np.full((1, 2, 2), i % 256, np.uint8)))
    (tmp_path / "0009.png").rename(tmp_path / "0009[1].png")  # a name that is a glob, read as the name it is
    spec = ReadSpec(str(tmp_path), input_format="images")
    (unit,) = plan_reads(list_partitions(str(tmp_path), "images"), spec).units
    (tmp_path / "0007.png").unlink()

    blocks = list(read_blocks(unit, spec))

    assert [len(block.ids) for block in blocks] == [256, 256, 88]
    errors = {row_id: error for block in blocks for row_id, error in zip(block.ids, block.errors, strict=True) if error}
    assert errors == {str(tmp_path / "0007.png"): "image file cannot be read (FileNotFoundError)"}


def test_the_reads_ray_data_makes_itself_retry_the_errors_fimood_retries(ray_session):
    """The monitor's summaries are read by Ray Data's Parquet reader: it retries what fimood's reads do."""
    start_ray()
    patterns = DataContext.get_current().retried_io_errors
    errors = [
        OSError(errno.EBUSY, "Please reduce your request rate."),  # S3's SlowDown, as s3fs raises it
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://store"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://store"),
        botocore.exceptions.ResponseStreamingError(error="connection reset"),
        http.client.IncompleteRead(b"", 10),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.ServerDisconnectedError(),
    ]
    for error in errors:
        assert transient(error) and any(pattern in str(error) for pattern in patterns), error


def test_footers_are_read_in_a_few_ray_tasks_at_a_time_and_come_back_in_order(tmp_path, ray_session, monkeypatch):
    from fimood.passes import reading

    start_ray()
    for i in range(7):
        write_shard(tmp_path / f"part-{i}.parquet", i + 1)
    paths = [str(tmp_path / f"part-{i}.parquet") for i in range(7)]
    monkeypatch.setattr(reading, "FOOTERS_PER_TASK", 2)
    monkeypatch.setattr(reading, "FOOTER_TASKS_IN_FLIGHT", 2)
    waited = []
    real_wait = reading.ray.wait
    monkeypatch.setattr(reading.ray, "wait", lambda refs, **kw: waited.append(len(refs)) or real_wait(refs, **kw))

    footers = reading.footers_in_tasks(paths, ReadSpec(str(tmp_path)))

    assert [sum(footer.group_rows) for footer in footers] == [1, 2, 3, 4, 5, 6, 7]
    assert max(waited) <= 2
