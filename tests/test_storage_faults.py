"""Storage faults on a real S3 endpoint on loopback (moto's server, stopped and restarted as an outage):
bounded retries, one clear failure, and readers that see one whole version of a partition, never a mix."""

import json
import threading
import time

import pyarrow as pa
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from fimood.cli import main
from fimood.lake.commit import MARKER, Marker, OutputFolder, read_committed
from fimood.lake.tables import parquet_bytes
from fimood.storage import RETRY_SECONDS_ENV, StorageUnavailable, read_bytes, write_bytes

SECRET = "secret-that-must-never-be-printed-0815"
ROWS_PER_FILE, FILES_PER_VERSION = 50, 3


class Store:
    """A moto S3 server that can go down and come back on the same port, its objects kept."""

    def __init__(self):
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        # The client's own retries kept short, so the tests measure fimood's.
        self.options = {
            "key": "testing-key",
            "secret": SECRET,
            "client_kwargs": {"endpoint_url": f"http://{self.host}:{self.port}", "region_name": "us-west-2"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
            "skip_instance_cache": True,
        }

    def fs(self) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(**self.options)

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address=self.host, port=self.port)
        self.server.start()


@pytest.fixture
def store():
    """A fresh bucket: moto keeps its objects for the life of the process, across servers."""
    store = Store()
    fs = store.fs()
    if fs.exists("faults"):
        fs.rm("faults", recursive=True)
    fs.mkdir("faults")
    yield store
    store.stop()


def test_an_outage_shorter_than_the_retry_time_is_ridden_out(store, monkeypatch):
    monkeypatch.setenv(RETRY_SECONDS_ENV, "60")
    store.stop()
    threading.Timer(3.0, store.start).start()
    start = time.monotonic()
    write_bytes("s3://faults/written-during-an-outage", b"payload", store.options)
    assert time.monotonic() - start >= 3.0
    assert read_bytes("s3://faults/written-during-an-outage", store.options) == b"payload"


def test_an_outage_longer_than_the_retry_time_stops_with_one_clear_error(store, monkeypatch):
    monkeypatch.setenv(RETRY_SECONDS_ENV, "2")
    store.stop()
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"faults: the storage did not answer for 2 s") as error:
        write_bytes("s3://faults/x", b"payload", store.options)
    assert time.monotonic() - start < 20 and SECRET not in str(error.value)


def test_the_cli_says_the_storage_is_unavailable_in_one_line_after_its_retries(store, monkeypatch, capsys):
    monkeypatch.setenv(RETRY_SECONDS_ENV, "2")
    store.stop()
    status = main(
        [
            "score",
            "--detector",
            "s3://faults/d",
            "--data",
            "s3://faults/in",
            "--out",
            "s3://faults/out",
            "--storage-options",
            json.dumps(store.options),
        ]
    )
    *retries, error = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and error.startswith("fimood score: storage unavailable: exists faults/d/manifest.json")
    assert all("trying again in" in line for line in retries)  # no traceback: the retries, then one line
    assert SECRET not in error + "".join(retries)


def test_a_commit_cut_by_an_outage_keeps_the_previous_version(store, monkeypatch):
    """The store goes down while the new files move in: the commit fails clearly; readers get the previous
    version meanwhile and after the store is back; `recover` restores it whole, marker included."""
    monkeypatch.setenv(RETRY_SECONDS_ENV, "2")
    fs = store.fs()
    folder = OutputFolder(fs, "faults/out/date=1")
    folder.commit(_stage(fs, "faults/staged-1", version=1), _marker("run1"))
    staged = _stage(fs, "faults/staged-2", version=2)
    moves = []
    original_mv = fs.mv

    def mv_then_outage(source, target, **kwargs):
        original_mv(source, target, **kwargs)
        moves.append(target)
        if len(moves) == 1:
            store.stop()

    monkeypatch.setattr(fs, "mv", mv_then_outage)
    with pytest.raises(StorageUnavailable):
        OutputFolder(fs, "faults/out/date=1").commit(staged, _marker("run2"))
    store.start()
    monkeypatch.setattr(fs, "mv", original_mv)
    assert not fs.exists(f"faults/out/date=1/{MARKER}")  # cut between removing the marker and writing the new one
    assert _versions(read_committed("s3://faults/out", store.options)) == {1}
    folder.recover()
    assert folder.read_marker().run == "run1" and _versions(read_committed("s3://faults/out", store.options)) == {1}
    names = sorted(path.rsplit("/", 1)[-1] for path in fs.ls("faults/out/date=1", refresh=True))
    assert names == sorted([*folder.read_marker().files, MARKER])


def test_readers_see_one_whole_version_while_commits_run(store):
    """A reader loops over `read_committed` while five new versions are committed: every read is one whole
    version (all its rows, one version number), never a mix and never an empty partition."""
    fs = store.fs()
    folder = OutputFolder(fs, "faults/out/date=1")
    folder.commit(_stage(fs, "faults/staged-1", version=1), _marker("run1"))
    seen, done = [], threading.Event()

    def read_until_done():
        while not done.is_set():
            table = read_committed("s3://faults/out", store.options)
            seen.append((table.num_rows, frozenset(table.column("version").to_pylist())))

    reader = threading.Thread(target=read_until_done)
    reader.start()
    for version in range(2, 7):
        folder.commit(_stage(fs, f"faults/staged-{version}", version=version), _marker(f"run{version}"))
    done.set()
    reader.join()
    assert len(seen) >= 5 and len({versions for _, versions in seen}) >= 2
    assert all(rows == ROWS_PER_FILE * FILES_PER_VERSION and len(versions) == 1 for rows, versions in seen), seen


def _stage(fs, prefix: str, version: int) -> list[str]:
    paths = []
    for index in range(FILES_PER_VERSION):
        rows = [{"id": f"{index}-{row}", "version": version} for row in range(ROWS_PER_FILE)]
        path = f"{prefix}/{index:05d}.parquet"
        fs.pipe_file(path, parquet_bytes(pa.Table.from_pylist(rows)))
        paths.append(path)
    return paths


def _marker(run: str) -> Marker:
    return Marker("detector", [], [], ROWS_PER_FILE * FILES_PER_VERSION, 0, run=run)


def _versions(table: pa.Table) -> set[int]:
    assert table.num_rows == ROWS_PER_FILE * FILES_PER_VERSION
    return set(table.column("version").to_pylist())


def test_a_storage_outage_inside_a_ray_task_reaches_the_caller_as_one_line(ray_session):
    import ray

    from fimood.passes.runtime import storage_errors_in_one_line

    def write_row(row):
        raise StorageUnavailable("pipe_file faults/x: the storage did not answer for 2 s")

    with pytest.raises(StorageUnavailable) as error, storage_errors_in_one_line():
        ray.data.range(2).map(write_row).materialize()
    assert str(error.value) == "pipe_file faults/x: the storage did not answer for 2 s"


def test_a_score_pass_rides_out_an_outage_while_it_writes(store, lake):
    """The store goes down for 3 s as soon as the run's first staged file lands (Ray tasks writing, or the
    driver committing, whichever is under way): every call waits it out, and the run ends with rows in
    = rows out, every partition committed."""
    from fimood import passes
    from fimood.lake.tables import write_image_parquet
    from fimood.onboarding.datasets import load_source

    mnist = load_source("mnist", limit=120)
    for day, rows in (("date=1", slice(0, 60)), ("date=2", slice(60, 120))):
        url = f"s3://faults/in/{day}"
        write_image_parquet(url, mnist.ids[rows], mnist.images[rows], rows_per_shard=20, storage_options=store.options)
    watcher, done, outages = store.fs(), threading.Event(), []

    def outage_at_first_staged_file():
        while not done.is_set():
            if watcher.exists("faults/out/_staging") and watcher.find("faults/out/_staging", withdirs=False):
                outages.append(time.monotonic())
                store.stop()
                time.sleep(3.0)
                store.start()
                return
            time.sleep(0.05)
            watcher.invalidate_cache()

    thread = threading.Thread(target=outage_at_first_staged_file)
    thread.start()
    try:
        config = passes.PipelineConfig(batch_size=32, storage_options=store.options)
        summary = passes.score(lake["detector"], "s3://faults/in", "s3://faults/out", config)
    finally:
        done.set()
        thread.join()
    table = read_committed("s3://faults/out", store.options)
    assert outages, "the store went down while the run was under way"
    assert summary.rows == table.num_rows == 120 and sorted(table.column("id").to_pylist()) == sorted(mnist.ids)
