"""The score table as users read it: DuckDB, Polars and pyarrow, each with its own Delta reader in a process
of its own, loop over the table while partitions are re-committed, on local disk and on a loopback S3.
Every read must succeed and give each partition one whole version: all its rows, once, of one version."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SCORE_ROWS, commit_scores
from loopback_s3 import LoopbackS3

from fimood.lake.delta import delta_location
from fimood.lake.score_table import ScoreTable, partition_value

FOLDERS = ["date=2026-11-25", "date=2026-11-26", "raw/cam-1", ""]  # Hive-style, plain, and the data URL itself
RECOMMITS = 5  # at least; commits go on until every reader has read this often while they ran
READS_DURING_COMMITS = 5
READER = Path(__file__).with_name("table_reader.py")
SECRET = "secret-that-must-never-be-printed-2718"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "scores"), None
        return
    store = LoopbackS3(SECRET)
    try:
        yield f"s3://{store.bucket('readers')}/scores", store.options
    finally:
        store.close()


def test_every_reader_gets_one_whole_version_of_each_partition_while_commits_run(output, tmp_path):
    url, options = output
    table = ScoreTable(url, options)
    commit_scores(table, FOLDERS, 0)
    uri, delta_options = delta_location(url, options)
    stop, logs = tmp_path / "stop", {}
    readers = {}
    for engine in ("duckdb", "polars", "pyarrow"):
        logs[engine] = tmp_path / f"{engine}.jsonl"
        with logs[engine].open("w") as log:
            command = [sys.executable, str(READER), engine, uri, json.dumps(delta_options), str(stop)]
            readers[engine] = subprocess.Popen(command, stdout=log, stderr=subprocess.DEVNULL)

    def reads() -> dict[str, int]:
        return {engine: len(path.read_text().splitlines()) for engine, path in logs.items()}

    deadline = time.monotonic() + 120
    while min(reads().values()) == 0:  # every reader is up and has read the first version
        assert time.monotonic() < deadline, f"a reader never read: {reads()}"
        time.sleep(0.2)
    before, version = reads(), 0
    while version < RECOMMITS or min(n - before[e] for e, n in reads().items()) < READS_DURING_COMMITS:
        assert time.monotonic() < deadline + 300, f"the readers read too slowly: {reads()}"
        version += 1
        commit_scores(table, FOLDERS, version)
    stop.touch()
    for reader in readers.values():
        reader.wait(timeout=60)

    expected_partitions = {partition_value(folder) for folder in FOLDERS}
    for engine, path in logs.items():
        results = [json.loads(line) for line in path.read_text().splitlines()]
        errors = [result["error"] for result in results if "error" in result]
        assert not errors, f"{engine}: {len(errors)} of {len(results)} reads failed, e.g. {errors[0]}"
        for result in results:
            partitions = result["partitions"]
            assert set(partitions) == expected_partitions, f"{engine}: a partition is missing: {sorted(partitions)}"
            for partition, (rows, distinct, versions) in partitions.items():
                assert (rows, distinct, len(versions)) == (SCORE_ROWS, SCORE_ROWS, 1), (
                    f"{engine} read a mix of {partition}"
                )
        assert len(results) >= READS_DURING_COMMITS, engine
    assert version >= RECOMMITS
    print(f"{url}: {version} re-commits of {len(FOLDERS)} partitions; reads: {reads()}")  # shown with -s
    assert SECRET not in "".join(path.read_text() for path in logs.values())
