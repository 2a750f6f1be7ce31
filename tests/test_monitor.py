"""Nightly monitoring end to end: seven nights of FashionMNIST, the last three with 20% MNIST mixed in."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import duckdb_with_delta
from deltalake import DeltaTable

from fimood import passes
from fimood.cli import main
from fimood.lake.delta import ConcurrentWriters
from fimood.lake.tables import write_image_parquet
from fimood.models import Glow, save_model, training_data_record
from fimood.models.training import TrainConfig, train
from fimood.monitor.history import HISTORY_SCHEMA, SCHEMA_VERSION, read_history, read_stream, write_history_rows
from fimood.onboarding.datasets import load_source

NIGHTS = [f"2026-11-0{day}" for day in range(1, 8)]
SHIFTED = NIGHTS[4:]
ROWS_PER_NIGHT = 500
FIT_ROWS = 2000
MNIST_SHARE = 0.2


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, ray_session):
    """A tiny Glow trained on FashionMNIST's train split, its detector fitted on fresh test-split rows, and a
    lake of seven nightly partitions of other fresh rows."""
    root = tmp_path_factory.mktemp("monitor")
    fashion = load_source("fashion-mnist", "test", limit=FIT_ROWS + len(NIGHTS) * ROWS_PER_NIGHT)
    mnist = load_source("mnist", limit=len(SHIFTED) * ROWS_PER_NIGHT)
    torch.manual_seed(0)
    model = Glow.from_preset("tiny")
    training = load_source("fashion-mnist", "train", limit=FIT_ROWS)
    train(model, training.images, TrainConfig(steps=100, batch_size=32, warmup_steps=10), progress=False)
    names = ("train", "model", "fit", "lake", "detector", "scores", "history", "report")
    urls = {name: str(root / name) for name in names}
    write_image_parquet(urls["train"], training.ids, training.images)
    model.training_data = training_data_record(urls["train"], (0.0, 1.0), training.ids)
    save_model(model, urls["model"])
    write_image_parquet(urls["fit"], fashion.ids[:FIT_ROWS], fashion.images[:FIT_ROWS], rows_per_shard=500)
    detector, _ = passes.fit(urls["model"], urls["fit"], passes.PipelineConfig(batch_size=64))
    detector.save(urls["detector"])
    taken_fashion, taken_mnist = FIT_ROWS, 0
    for night in NIGHTS:
        n_mnist = int(MNIST_SHARE * ROWS_PER_NIGHT) if night in SHIFTED else 0
        n_fashion = ROWS_PER_NIGHT - n_mnist
        ids = fashion.ids[taken_fashion : taken_fashion + n_fashion] + mnist.ids[taken_mnist : taken_mnist + n_mnist]
        images = np.concatenate(
            [
                fashion.images[taken_fashion : taken_fashion + n_fashion],
                mnist.images[taken_mnist : taken_mnist + n_mnist],
            ]
        )
        write_image_parquet(f"{urls['lake']}/date={night}", ids, images, rows_per_shard=250)
        taken_fashion, taken_mnist = taken_fashion + n_fashion, taken_mnist + n_mnist
    return urls


def monitor(urls: dict, *extra: str) -> int:
    flags = [f"--{name}={urls[name]}" for name in ("detector", "scores", "history", "report")]
    return main(["monitor", f"--data={urls['lake']}", *flags, "--batch-size=64", *extra])


def verdicts(urls: dict) -> dict[str, str]:
    summary = json.loads(Path(urls["report"], "summary.json").read_text())
    assert summary["schema"] == "fimood-monitor-summary" and summary["schema_version"] == 4
    return {entry["partition"]: entry for entry in summary["partitions"]}


def test_the_shifted_nights_are_flagged_with_their_layers_and_the_exit_code_says_shift(monitored):
    assert monitor(monitored) == 3
    found = verdicts(monitored)
    assert {night: found[f"date={night}"]["verdict"] for night in NIGHTS} == {
        night: "shift" if night in SHIFTED else "ok" for night in NIGHTS
    }
    for night in SHIFTED:
        assert found[f"date={night}"]["top_layers"], "a shift names the layers that moved"
    page = Path(monitored["report"], "index.html").read_text()
    assert found[f"date={SHIFTED[0]}"]["top_layers"][0] in page and page.count("data:image/png;base64,") >= 4
    # what the nights wrote, read as users read it: the score table with DuckDB, the history with Polars
    duckdb = duckdb_with_delta()
    per_night = duckdb.sql(
        f"SELECT partition, count(*), count(DISTINCT id) FROM delta_scan('{monitored['scores']}') GROUP BY partition"
    ).fetchall()
    assert sorted(per_night) == [(f"date={night}", ROWS_PER_NIGHT, ROWS_PER_NIGHT) for night in NIGHTS]
    history = polars.read_delta(monitored["history"]).sort("partition")
    assert history["partition"].to_list() == [f"date={night}" for night in NIGHTS]
    assert history["verdict"].to_list() == [found[f"date={night}"]["verdict"] for night in NIGHTS]


def test_a_partition_is_tested_once_per_version_of_its_shards(monitored, capsys):
    """A rerun tests nothing that is unchanged (the history keeps its rows, the run says so) and keeps the
    alarms it raised (exit 3, each shifted partition named); a partition whose shards changed is scored and
    tested again, and only its row is replaced."""
    if not Path(monitored["history"]).exists():
        assert monitor(monitored) == 3
    before = {row["partition"]: row for row in read_history(monitored["history"], stream(monitored))}
    capsys.readouterr()

    assert monitor(monitored) == 3
    out = capsys.readouterr().out
    assert f"0 partitions: none new; {len(NIGHTS)} unchanged since tested" in out
    assert [line.split()[2].rstrip(":") for line in out.splitlines() if "STILL SHIFT" in line] == [
        f"date={night}" for night in SHIFTED
    ]
    assert read_history(monitored["history"], stream(monitored)) == list(before.values())

    shard = Path(monitored["lake"], f"date={SHIFTED[1]}", "part-00000.parquet")
    shard.write_bytes(shard.read_bytes())  # rewritten: a new version of the same rows
    assert monitor(monitored) == 3
    rows = {row["partition"]: row for row in read_history(monitored["history"], stream(monitored))}
    assert list(rows) == [f"date={night}" for night in NIGHTS]
    changed = {name for name in rows if rows[name]["scores_version"] != before[name]["scores_version"]}
    assert changed == {f"date={SHIFTED[1]}"} and rows[f"date={SHIFTED[1]}"]["verdict"] == "shift"
    table = DeltaTable(monitored["history"]).to_pyarrow_table()
    assert table.num_rows == len(NIGHTS) and set(table.column("stream").to_pylist()) == {stream(monitored)}
    assert set(table.column("detector_id").to_pylist()) == {detector_id(monitored)}


def test_a_report_that_cannot_be_written_leaves_the_verdicts_and_the_history(monitored, tmp_path, monkeypatch, capsys):
    from fimood.monitor import runner

    def broken(*args, **kwargs):
        raise OSError("the report's disk is full")

    monkeypatch.setattr(runner, "write_monitor_report", broken)
    urls = {**monitored, "history": str(tmp_path / "history"), "report": str(tmp_path / "report")}
    assert monitor(urls, f"--partitions=date={SHIFTED[1]}", "--alpha=0.01") == 3  # the shift, not "could not run"
    assert "report: NOT WRITTEN: OSError: the report's disk is full" in capsys.readouterr().out
    table = DeltaTable(urls["history"]).to_pyarrow_table()
    assert table.column("verdict").to_pylist() == ["shift"]


def test_the_history_is_a_delta_table_of_exactly_the_declared_schema(tmp_path):
    write_history_rows(str(tmp_path), "d", [{"partition": "date=2026-11-01", "verdict": "ok", "z_sum": [0.5]}])
    table = DeltaTable(str(tmp_path))
    assert pa.schema(table.schema().to_arrow()).equals(HISTORY_SCHEMA) and table.metadata().partition_columns == [
        "stream"
    ]
    rows = table.to_pyarrow_table()
    assert rows.schema.equals(HISTORY_SCHEMA) and rows.column("schema_version").to_pylist() == [SCHEMA_VERSION]


def test_history_writers_for_different_nights_keep_each_others_rows(tmp_path):
    """Seven monitors writing their night at once into a new history: every night is kept, once."""

    def write(night: str) -> None:
        write_history_rows(str(tmp_path), "d", [{"partition": f"date={night}", "verdict": "ok"}])

    with ThreadPoolExecutor(len(NIGHTS)) as pool:
        for written in [pool.submit(write, night) for night in NIGHTS]:
            written.result()  # a writer's error fails the test
    write("2026-11-03")  # and a re-run
    assert [row["partition"] for row in read_history(str(tmp_path), "d")] == [f"date={night}" for night in NIGHTS]


def test_a_monitor_whose_stream_was_written_since_it_read_it_stops_in_one_line(tmp_path):
    """Its lifetime budget decided on the nights it read: written over a night it did not see, the
    guarantee would not hold. Another stream's writes are no conflict."""
    url = str(tmp_path)
    write_history_rows(url, "d", [{"partition": "date=1", "verdict": "ok"}])
    seen_by_a = read_stream(url, "d")
    write_history_rows(url, "d", [{"partition": "date=2", "verdict": "ok"}], read=read_stream(url, "d"))  # B
    write_history_rows(url, "e", [{"partition": "date=9", "verdict": "ok"}], read=read_stream(url, "e"))
    with pytest.raises(ConcurrentWriters, match="run this night again"):
        write_history_rows(url, "d", [{"partition": "date=3", "verdict": "shift"}], read=seen_by_a)
    assert [row["partition"] for row in read_history(url, "d")] == ["date=1", "date=2"]
    write_history_rows(url, "d", [{"partition": "date=3", "verdict": "shift"}], read=read_stream(url, "d"))  # again
    assert [row["partition"] for row in read_history(url, "d")] == ["date=1", "date=2", "date=3"]


def test_monitors_deciding_at_once_on_one_new_stream_commit_one_and_stop_the_others(tmp_path):
    url, start = str(tmp_path), threading.Barrier(len(NIGHTS))

    def monitor_night(night: str) -> str:
        seen = read_stream(url, "d")
        start.wait()
        try:
            write_history_rows(url, "d", [{"partition": f"date={night}", "verdict": "ok"}], read=seen)
            return night
        except ConcurrentWriters:
            return ""

    with ThreadPoolExecutor(len(NIGHTS)) as pool:
        committed = [night for night in pool.map(monitor_night, NIGHTS) if night]
    assert len(committed) == 1
    assert [row["partition"] for row in read_history(url, "d")] == [f"date={night}" for night in committed]


def test_a_night_that_cannot_be_scored_exits_could_not_run(monitored, tmp_path):
    urls = {**monitored, **{name: str(tmp_path / name) for name in ("lake", "scores", "history", "report")}}
    shutil.copytree(Path(monitored["lake"], f"date={NIGHTS[0]}"), Path(urls["lake"], f"date={NIGHTS[0]}"))
    broken = Path(urls["lake"], f"date={NIGHTS[1]}")
    broken.mkdir()
    ids = pq.read_table(Path(monitored["lake"], f"date={NIGHTS[1]}"), columns=["id"]).column("id")
    pq.write_table(pa.table({"id": ids, "image": [b"not an image"] * len(ids)}), broken / "part-00000.parquet")
    assert monitor(urls) == 4
    found = verdicts(urls)
    assert found[f"date={NIGHTS[0]}"]["verdict"] == "ok"
    assert (
        found[f"date={NIGHTS[1]}"]["verdict"] == "could not run"
        and "error fraction" in found[f"date={NIGHTS[1]}"]["reason"]
    )


def test_a_monitor_with_nothing_to_read_says_so_in_one_line(monitored, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert monitor({**monitored, "lake": str(tmp_path / "empty")}) == 4
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (.ci/setup installs it)")
def test_the_report_opens_in_headless_chromium_without_console_errors(monitored, tmp_path):
    if not Path(monitored["report"], "index.html").exists():
        monitor(monitored)
    page = Path(monitored["report"], "index.html")
    run = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "fimood monitor" in run.stdout and run.stdout.count("<img") >= 4
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []


def stream(urls: dict) -> str:
    return json.loads(Path(urls["report"], "summary.json").read_text())["stream"]


def detector_id(urls: dict) -> str:
    from fimood.method.detector import DetectorArtifact

    return DetectorArtifact.load(urls["detector"]).detector_id


def test_a_detector_fitted_on_the_models_training_rows_is_refused_unless_allowed(monitored, tmp_path, capsys):
    """Rows a model was trained on fit it better than fresh rows: every fresh night would look shifted."""
    urls = {**monitored, **{name: str(tmp_path / name) for name in ("detector", "scores", "history", "report")}}
    detector, _ = passes.fit(monitored["model"], monitored["train"], passes.PipelineConfig(batch_size=64))
    detector.save(urls["detector"])
    assert monitor(urls, "--partitions", f"date={NIGHTS[0]}") == 4
    assert "trained on" in capsys.readouterr().err and not Path(urls["history"]).exists()
    assert monitor(urls, "--partitions", f"date={NIGHTS[0]}", "--allow-training-rows") in (0, 3)
