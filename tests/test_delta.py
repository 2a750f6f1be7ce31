"""The Delta layer: fimood's fsspec storage options as delta-rs takes them; commits that replace only the
version a run planned from, whoever else writes at once; outputs this fimood cannot commit into
refused in one line before any work."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from fimood.cli import main
from fimood.lake import delta, schema
from fimood.lake.delta import delta_location
from fimood.lake.score_table import COMMITTED, Lineage, PartitionVersion, ScoreTable, read_scores
from fimood.storage import RETRY_SECONDS_ENV


def test_s3fs_options_become_delta_rs_options_and_its_own_pass_as_they_are(monkeypatch):
    monkeypatch.setenv(RETRY_SECONDS_ENV, "7")
    options = {
        "key": "k",
        "secret": "s",
        "token": "t",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}},  # fsspec's own: not delta-rs's business
        "aws_conditional_put": "etag",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "false",
    }
    uri, translated = delta_location("s3://bucket/scores/", options)
    assert uri == "s3://bucket/scores"
    assert translated == {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_SESSION_TOKEN": "t",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_ALLOW_HTTP": "true",
        "aws_conditional_put": "etag",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "false",
    }
    tuned = delta.tuned(uri, translated)  # what fimood's own calls add: outages ridden out as fimood's are
    assert (tuned["retry_timeout"], tuned["max_retries"]) == ("7s", "1000")


def test_s3fs_names_are_not_read_into_another_stores_options_and_memory_urls_are_refused():
    with pytest.raises(ValueError, match=r"\['token'\] have no Delta Lake equivalent"):
        delta_location("gs://bucket/scores", {"token": "gcsfs-token"})
    with pytest.raises(ValueError, match="not memory://"):
        delta_location("memory://scores")


def test_a_local_path_becomes_absolute_and_needs_no_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert delta_location("scores") == (os.path.join(str(tmp_path), "scores"), {})
    assert delta_location(f"file://{tmp_path}/scores")[0] == f"{tmp_path}/scores"


def test_an_option_delta_rs_has_no_equivalent_for_is_refused_not_dropped():
    with pytest.raises(ValueError, match=r"\['use_ssl'\] have no Delta Lake equivalent"):
        delta_location("s3://bucket/scores", {"use_ssl": False})


def test_an_output_of_fimood_0_2_is_refused_in_one_line_before_any_work(lake, tmp_path, capsys):
    legacy = tmp_path / "scores" / "date=2026-11-25"
    legacy.mkdir(parents=True)
    (legacy / "_SUCCESS").write_text("{}")
    status = main(["score", "--detector", lake["detector"], "--data", lake["mnist"], "--out", str(tmp_path / "scores")])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1 and "written by fimood 0.2" in error[0]
    assert not (tmp_path / "scores" / "_delta_log").exists()


def test_a_delta_table_that_is_not_a_score_table_is_refused(tmp_path):
    write_deltalake(str(tmp_path / "other"), pa.table({"x": [1]}))
    with pytest.raises(ValueError, match="not a fimood score table"):
        ScoreTable(str(tmp_path / "other")).check()


def new_version(table: ScoreTable, folder: str, name: str, ids: list[str], planned=None) -> PartitionVersion:
    """A partition's new version from one data file of these ids, as a score run's write task writes it."""
    rows = {
        "id": ids,
        "ood_score": [0.0] * len(ids),
        "p_value": [0.5] * len(ids),
        "is_ood": [False] * len(ids),
        "nll": [1.0] * len(ids),
        "error": [None] * len(ids),
        "detector_id": ["d" * 64] * len(ids),
    }
    file = table.write_data_file(folder, pa.table(rows, schema=schema.score_schema()), lineage(name).lineage_id)
    return PartitionVersion(folder, lineage(name), planned, (file,))


def replace(table: ScoreTable, folder: str, name: str, ids: list[str], planned=None) -> str:
    """What `commit` said of the partition: committed, the same lineage, or why not."""
    table.create()
    return table.commit([new_version(table, folder, name, ids, planned)], f"run-{name}")[folder]


def lineage(name: str) -> Lineage:
    return Lineage("d" * 64, [{"path": name, "size": 1, "version": "1"}], False)


@pytest.mark.parametrize("round_", range(4))
def test_runs_creating_a_table_at_once_commit_one_version_of_a_partition_never_two(tmp_path, round_):
    """Six runs commit the same partition of a table that does not exist yet, each from its own inputs:
    one commits, the others stop in one line, and the partition holds that one run's rows, once."""
    table, start = ScoreTable(str(tmp_path / "scores")), threading.Barrier(6)

    def run(index: int) -> str:
        version = new_version(table, "d", f"run-{index}", [f"run{index}-{i}" for i in range(5)])
        start.wait()
        table.create()
        said = table.commit([version], f"run-{index}")["d"]
        return said if said == COMMITTED else "stopped" if "another run committed" in said else said

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(run, range(6)))
    ids = read_scores(str(tmp_path / "scores")).column("id").to_pylist()
    assert sorted(outcomes) == ["committed"] + ["stopped"] * 5
    assert len(ids) == 5 and len({i.split("-")[0] for i in ids}) == 1


def test_runs_committing_other_partitions_at_once_all_commit(tmp_path):
    """Six runs commit six partitions at once: each loses races to the others and tries again on the
    version they made, until every partition is committed once."""
    table, start = ScoreTable(str(tmp_path / "scores")), threading.Barrier(6)
    table.create()

    def run(index: int) -> str:
        version = new_version(table, f"p{index}", f"run-{index}", [f"p{index}-{i}" for i in range(3)])
        start.wait()
        return table.commit([version], f"run-{index}")[f"p{index}"]

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(run, range(6))) == [COMMITTED] * 6
    assert read_scores(str(tmp_path / "scores")).num_rows == 18 and set(table.committed()) == {
        f"p{i}" for i in range(6)
    }


def test_a_commit_replaces_only_the_version_its_run_planned_from(tmp_path):
    """Run A plans; run B then commits partition d; A's commit of d stops in one line and B's version
    stands. A commit on another partition meanwhile is no conflict."""
    table = ScoreTable(str(tmp_path / "scores"))
    assert replace(table, "d", "v0", ["v0-0"]) == COMMITTED
    planned = table.committed()  # run A plans here
    assert replace(table, "d", "b", ["b-0", "b-1"], planned.get("d")) == COMMITTED
    assert replace(table, "e", "e", ["e-0"]) == COMMITTED
    assert "another run committed partition 'd' since this one read it" in replace(
        table, "d", "a", ["a-0"], planned.get("d")
    )
    assert sorted(read_scores(str(tmp_path / "scores")).column("id").to_pylist()) == ["b-0", "b-1", "e-0"]
    assert replace(table, "f", "a-f", ["f-0"], planned.get("f")) == COMMITTED
    assert table.lineage(table.committed()["d"].lineage_id)["inputs"] == lineage("b").document()["inputs"]
