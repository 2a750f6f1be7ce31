"""End to end against a real S3 endpoint on loopback (moto's server), through s3fs as in production."""

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import s3fs
from conftest import DAYS
from moto.server import ThreadedMotoServer

from fimood import passes
from fimood.lake.tables import write_image_parquet
from fimood.method.detector import DetectorArtifact
from fimood.method.features import compute_features
from fimood.models import load_model, save_model
from fimood.onboarding.datasets import load_source

SECRET = "secret-that-must-never-be-written-4711"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1; credentials travel as fsspec storage options, as with --storage-options."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing-key",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-west-2"},
    }
    s3fs.S3FileSystem(**options).mkdir("lake")
    yield options
    server.stop()


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
    table = (
        pads.dataset("lake/scores", filesystem=fs, format="parquet", partitioning="hive", ignore_prefixes=["_", "."])
        .to_table()
        .sort_by("id")
    )
    ids = table.column("id").to_pylist()
    assert fitted.rows == 200 and summary.rows == table.num_rows == 120 and len(set(ids)) == 120
    assert sorted(fs.ls("lake/scores")) == [f"lake/scores/date={day}" for day in DAYS]
    assert all(fs.exists(f"lake/scores/date={day}/_SUCCESS") for day in DAYS)
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
