"""Storage faults on a real S3 endpoint on loopback (moto's server behind a proxy that goes down and comes
back, as an outage): bounded retries, one clear failure, and a commit cut by an outage that leaves the
previous version whole."""

import json
import threading
import time

import pytest
from conftest import SCORE_ROWS, commit_scores, read_scores
from loopback_s3 import LoopbackS3

from fimood.cli import main
from fimood.lake.score_table import ScoreTable
from fimood.storage import RETRY_SECONDS_ENV, StorageUnavailable, read_bytes, write_bytes

SECRET = "secret-that-must-never-be-printed-0815"


@pytest.fixture(scope="module")
def loopback():
    store = LoopbackS3(SECRET, outages=True, client_retries=False)
    yield store
    store.close()


@pytest.fixture
def store(loopback):
    """The store up, with a fresh bucket."""
    if loopback.proxy.poll() is not None:
        loopback.start()
    loopback.bucket("faults")
    return loopback


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
    """The store goes down as a partition's new version is committed: the commit fails with one clear
    error after the retry time, and readers get the previous version, whole, once the store is back."""
    table = ScoreTable("s3://faults/out", store.options)
    commit_scores(table, ["date=1"], version=1)
    monkeypatch.setenv(RETRY_SECONDS_ENV, "2")
    table = ScoreTable("s3://faults/out", store.options)  # its retry time read anew
    commit = table.commit

    def outage_then_commit(*args):
        store.stop()
        return commit(*args)

    monkeypatch.setattr(table, "commit", outage_then_commit)
    with pytest.raises(StorageUnavailable, match="did not answer") as error:
        commit_scores(table, ["date=1"], version=2)
    store.start()
    assert SECRET not in str(error.value)
    rows = read_scores("s3://faults/out", store.options)
    assert rows.num_rows == SCORE_ROWS and {i.split("-")[0] for i in rows.column("id").to_pylist()} == {"v1"}


def test_a_storage_outage_inside_a_ray_task_reaches_the_caller_as_one_line(ray_session):
    import ray

    from fimood.passes.runtime import errors_in_one_line

    def write_row(row):
        raise StorageUnavailable("pipe_file faults/x: the storage did not answer for 2 s")

    with pytest.raises(StorageUnavailable) as error, errors_in_one_line():
        ray.data.range(2).map(write_row).materialize()
    assert str(error.value) == "pipe_file faults/x: the storage did not answer for 2 s"


def test_a_score_pass_rides_out_an_outage_while_it_writes(store, lake):
    """The store goes down for 3 s as soon as the run's first data file lands (Ray tasks writing, or the
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

    def outage_at_first_data_file():
        while not done.is_set():
            if watcher.exists("faults/out") and watcher.glob("faults/out/partition=*/*.parquet"):
                outages.append(time.monotonic())
                store.stop()
                time.sleep(3.0)
                store.start()
                return
            time.sleep(0.05)
            watcher.invalidate_cache()

    thread = threading.Thread(target=outage_at_first_data_file)
    thread.start()
    try:
        config = passes.PipelineConfig(batch_size=32, storage_options=store.options)
        summary = passes.score(lake["detector"], "s3://faults/in", "s3://faults/out", config)
    finally:
        done.set()
        thread.join()
    table = read_scores("s3://faults/out", store.options)
    assert outages, "the store went down while the run was under way"
    assert summary.rows == table.num_rows == 120 and sorted(table.column("id").to_pylist()) == sorted(mnist.ids)
