"""End to end against a real S3 endpoint on loopback (moto's server), through s3fs and delta-rs as in production."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars
import pytest
import s3fs
from conftest import DAYS, read_scores
from deltalake import DeltaTable
from loopback_s3 import LoopbackS3

from fimood import passes
from fimood.lake.delta import delta_location
from fimood.lake.tables import write_image_parquet
from fimood.method.detector import DetectorArtifact
from fimood.method.features import compute_features
from fimood.models import load_model, save_model
from fimood.onboarding.datasets import load_source

SECRET = "secret-that-must-never-be-written-4711"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1; credentials travel as fsspec storage options, as with --storage-options."""
    store = LoopbackS3(SECRET)
    store.bucket("lake")
    yield store.options
    store.close()


def test_fit_and_score_on_s3(s3, lake, tmp_path):
    """Upload shards, fit, score; rows in = rows out, unique ids, partitions kept, scores as in-process."""
    save_model(load_model(lake["model"]), "s3://lake/model", s3)
    fashion = load_source("fashion-mnist", "test", limit=400)
    write_image_parquet("s3://lake/fit", fashion.ids[200:], fashion.images[200:], rows_per_shard=50, storage_options=s3)
    mnist = load_source("mnist", limit=120)
    for day, rows in zip(DAYS, (slice(0, 70), slice(70, 120)), strict=True):
        write_image_parquet(
            f"s3://lake/mnist/date={day}", mnist.ids[rows], mnist.images[rows], rows_per_shard=32, storage_options=s3
        )
    config = passes.PipelineConfig(batch_size=32, storage_options=s3)
    detector, fitted = passes.fit("s3://lake/model", "s3://lake/fit", config)
    detector.save("s3://lake/detector", s3)
    summary = passes.score("s3://lake/detector", "s3://lake/mnist", "s3://lake/scores", config)

    fs = s3fs.S3FileSystem(**s3)
    uri, delta_options = delta_location("s3://lake/scores", s3)
    table = polars.read_delta(uri, storage_options=delta_options).to_arrow().sort_by("id")  # as a user reads it
    ids = table.column("id").to_pylist()
    assert fitted.rows == 200 and summary.rows == table.num_rows == 120 and len(set(ids)) == 120
    assert sorted(set(table.column("partition").to_pylist())) == [f"date={day}" for day in DAYS]
    order = np.argsort(mnist.ids)
    features = compute_features(load_model(lake["model"]), mnist.images[order], [mnist.ids[i] for i in order])
    expected = DetectorArtifact.load("s3://lake/detector", s3).by_group[1].ood_score(features.log_sq_norms)
    np.testing.assert_allclose(table.column("ood_score").to_numpy(), expected, rtol=1e-6)
    assert (
        "testing" not in repr(detector.extra) and "testing" not in fs.cat_file("lake/detector/manifest.json").decode()
    )


def test_monitor_on_s3_and_no_credential_anywhere(s3, lake, tmp_path):
    """The monitor's Ray reduce reads the score tables from S3; then every object the runs wrote, and
    Ray's logs of this session, are searched for the secret key: it is nowhere."""
    import json

    import ray

    from fimood.monitor import MonitorConfig, run_monitor
    from fimood.monitor.history import read_history

    fs = s3fs.S3FileSystem(**s3)
    if not fs.exists("lake/detector/manifest.json"):
        test_fit_and_score_on_s3(s3, lake, tmp_path)
    config = MonitorConfig(
        detector="s3://lake/detector",
        data="s3://lake/mnist",
        scores="s3://lake/monitor/scores",
        history="s3://lake/monitor/history",
        report="s3://lake/monitor/report",
        pipeline=passes.PipelineConfig(batch_size=32, storage_options=s3),
    )
    result = run_monitor(config)
    assert [v.partition for v in result.verdicts] == [f"date={day}" for day in DAYS]
    assert [row["partition"] for row in read_history(config.history, result.stream, s3)] == [
        f"date={day}" for day in DAYS
    ]
    assert json.loads(fs.cat_file("lake/monitor/report/summary.json"))["exit_code"] == result.exit_code

    written = {path: fs.cat_file(path) for path in fs.find("lake")}
    assert len(written) > 20 and not [path for path, data in written.items() if SECRET.encode() in data]
    session = ray._private.worker._global_node.get_session_dir_path()
    logs = [path for path in Path(session, "logs").rglob("*") if path.is_file()]  # every process's logs
    assert logs and not [path for path in logs if SECRET.encode() in path.read_bytes()]


def test_two_score_runs_at_once_over_one_output_keep_every_row_exactly_once(s3, lake, tmp_path):
    """Two `fimood score` processes started together on the same S3 output (the nightly run overrunning
    into a manual one): both end well and every input row is there once, each partition as one run
    made it (a run that finds a partition committed as it would commit it leaves it)."""
    import ray

    fs = s3fs.S3FileSystem(**s3)
    if not fs.exists("lake/detector/manifest.json"):
        test_fit_and_score_on_s3(s3, lake, tmp_path)
    command = [sys.executable, "-c", "import sys; from fimood.cli import main; sys.exit(main(sys.argv[1:]))", "score"]
    command += ["--detector=s3://lake/detector", "--data=s3://lake/mnist", "--out=s3://lake/together"]
    command += [f"--storage-options={json.dumps(s3)}", "--batch-size=32"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs

    table = read_scores("s3://lake/together", s3)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120 and sorted(ids) == sorted(load_source("mnist", limit=120).ids)
    uri, delta_options = delta_location("s3://lake/together", s3)
    commits = [c for c in DeltaTable(uri, storage_options=delta_options).history() if "fimood.run" in c]
    assert set(table.column("partition").to_pylist()) == {f"date={day}" for day in DAYS}
    assert (
        1 <= len({c["fimood.run"] for c in commits}) <= 2
        and 2 <= sum(int(c["fimood.partitions"]) for c in commits) <= 4
    )
