"""The Ray pipeline on local files: the fit and score passes keep every row, in its partition, scored as in-process."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DAYS, read_scores
from deltalake import DeltaTable

import fimood
from fimood import passes
from fimood.lake import schema
from fimood.lake.images import encode_png
from fimood.lake.score_table import ScoreTable
from fimood.method.detector import DetectorArtifact, DetectorSettings
from fimood.method.features import FeatureSettings, compute_features
from fimood.models import build_model, load_model, save_model
from fimood.onboarding.datasets import load_source


def test_rows_in_equal_rows_out_and_partitions_are_kept(lake, tmp_path):
    """Every input row once, in its input folder's partition, with what it was scored from beside it."""
    summary = passes.score(lake["detector"], lake["mnist"], str(tmp_path), passes.PipelineConfig())
    table = read_scores(str(tmp_path))
    ids = table.column("id").to_pylist()
    assert summary.rows == table.num_rows == 120 and summary.errors == 0
    assert sorted(ids) == sorted(load_source("mnist", limit=120).ids) and len(set(ids)) == 120
    by_day = table.group_by("partition").aggregate([("id", "count")]).to_pylist()
    assert {row["partition"]: row["id_count"] for row in by_day} == {f"date={DAYS[0]}": 70, f"date={DAYS[1]}": 50}
    first = table.filter(pa.compute.equal(table.column("partition"), f"date={DAYS[0]}"))
    assert set(first.column("detector_id").to_pylist()) == {DetectorArtifact.load(lake["detector"]).detector_id}
    assert set(first.column("fimood_version").to_pylist()) == {fimood.__version__}
    (lineage_id,) = set(first.column("lineage_id").to_pylist())
    lineage = ScoreTable(str(tmp_path)).lineage(lineage_id)  # _fimood/lineage/<id>.json beside the data
    inputs = sorted((Path(lake["mnist"]) / f"date={DAYS[0]}").glob("*.parquet"))
    assert [row["path"] for row in lineage["inputs"]] == [str(path) for path in inputs]
    assert lineage["z_scores"] is False and lineage["detector_id"] == first.column("detector_id")[0].as_py()


@pytest.mark.parametrize("z_scores", [False, True])
def test_the_written_score_table_has_exactly_the_declared_schema(lake, tmp_path, z_scores):
    """The Delta table's columns are the declared ones, in order, with their types; staged files carried the
    schema's version; z-scores are null unless asked for."""
    passes.score(lake["detector"], lake["mnist"], str(tmp_path), passes.PipelineConfig(), z_scores=z_scores)
    table = DeltaTable(str(tmp_path))
    assert pa.schema(table.schema().to_arrow()).equals(schema.table_schema())
    assert table.metadata().partition_columns == ["partition"]
    read_back = read_scores(str(tmp_path))
    assert read_back.schema.equals(schema.table_schema())
    assert (read_back.column("z_scores").null_count == 0) is z_scores
    commit = table.history(1)[0]
    assert commit["fimood.schema_version"] == str(schema.SCORE_SCHEMA_VERSION) and commit["fimood.version"]


def test_scores_equal_the_in_process_detector(lake, tmp_path):
    passes.score(lake["detector"], lake["mnist"], str(tmp_path), passes.PipelineConfig())
    table = read_scores(str(tmp_path)).sort_by("id")
    source = load_source("mnist", limit=120)
    order = np.argsort(source.ids)
    features = compute_features(load_model(lake["model"]), source.images[order], [source.ids[i] for i in order])
    expected = DetectorArtifact.load(lake["detector"]).by_group[1].ood_score(features.log_sq_norms)
    np.testing.assert_allclose(table.column("ood_score").to_numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(("batch_size", "num_actors"), [(1, 1), (7, 2), (64, 1)])
def test_batch_size_and_actor_count_do_not_change_scores(lake, tmp_path, batch_size, num_actors):
    config = passes.PipelineConfig(batch_size=batch_size, num_actors=num_actors)
    passes.score(lake["detector"], f"{lake['mnist']}/date={DAYS[1]}", str(tmp_path), config)
    reference = tmp_path.parent / "reference"
    if not reference.exists():
        passes.score(
            lake["detector"], f"{lake['mnist']}/date={DAYS[1]}", str(reference), passes.PipelineConfig(batch_size=16)
        )
    got, want = read_scores(str(tmp_path)).sort_by("id"), read_scores(str(reference)).sort_by("id")
    np.testing.assert_allclose(got.column("ood_score").to_numpy(), want.column("ood_score").to_numpy(), rtol=1e-6)


def test_bad_rows_come_out_with_an_error_and_no_score(lake, tmp_path):
    good = encode_png(load_source("mnist", limit=1).images[0])
    rows = {
        "id": ["ok", "corrupt", "missing", "wrong-size", "float-array"],
        "image": [good, b"\x89PNG broken", None, encode_png(np.zeros((1, 8, 8), np.uint8)), None],
    }
    table = pa.table(rows)
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    config = passes.PipelineConfig(max_error_fraction=1.0)  # four of five rows are bad, on purpose
    summary = passes.score(lake["detector"], str(tmp_path / "in"), str(tmp_path / "out"), config)
    out = {row["id"]: row for row in read_scores(str(tmp_path / "out")).to_pylist()}
    assert summary.rows == 5 and summary.errors == 4 and sorted(out) == sorted(rows["id"])
    assert out["ok"]["error"] is None and np.isfinite(out["ok"]["ood_score"])
    for row_id, reason in [("corrupt", "cannot be decoded"), ("missing", "missing"), ("wrong-size", "28x28")]:
        assert reason in out[row_id]["error"] and out[row_id]["ood_score"] is None and out[row_id]["is_ood"] is None


def test_a_rerun_replaces_and_resume_skips_committed_partitions(lake, tmp_path):
    config = passes.PipelineConfig()
    passes.score(lake["detector"], lake["mnist"], str(tmp_path), config)
    version = DeltaTable(str(tmp_path)).version()
    passes.score(lake["detector"], lake["mnist"], str(tmp_path), config)
    assert read_scores(str(tmp_path)).num_rows == 120  # replaced, not added
    assert DeltaTable(str(tmp_path)).version() == version + 1  # both completed in one write task: one commit
    resumed = passes.score(lake["detector"], lake["mnist"], str(tmp_path), config, resume=True)
    assert len(resumed.skipped) == 2 and resumed.rows == 0


def test_ids_are_derived_when_there_is_no_id_column(lake, tmp_path):
    images = load_source("mnist", limit=3).images
    pq.write_table(pa.table({"pixels": [encode_png(image) for image in images]}), tmp_path / "part-0.parquet")
    config = passes.PipelineConfig(image_column="pixels")
    passes.score(lake["detector"], str(tmp_path / "part-0.parquet"), str(tmp_path / "out"), config)
    ids = sorted(read_scores(str(tmp_path / "out")).column("id").to_pylist())
    assert ids == [f"{tmp_path}/part-0.parquet#{row}" for row in range(3)]


def test_image_files_and_pixel_arrays_are_read(lake, tmp_path):
    images = load_source("mnist", limit=2).images
    for index, image in enumerate(images):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"{index}.png").write_bytes(encode_png(image))
    passes.score(
        lake["detector"],
        str(tmp_path / "images"),
        str(tmp_path / "out-images"),
        passes.PipelineConfig(input_format="images"),
    )
    from_files = read_scores(str(tmp_path / "out-images")).sort_by("id")
    assert from_files.column("id").to_pylist() == [str(tmp_path / "images" / f"{i}.png") for i in range(2)]
    pq.write_table(
        pa.table({"id": from_files.column("id"), "image": [image[0].tolist() for image in images]}),
        tmp_path / "arrays.parquet",
    )
    passes.score(
        lake["detector"],
        str(tmp_path / "arrays.parquet"),
        str(tmp_path / "out-arrays"),
        passes.PipelineConfig(),
        z_scores=True,
    )
    from_arrays = read_scores(str(tmp_path / "out-arrays")).sort_by("id")
    np.testing.assert_allclose(
        from_arrays.column("ood_score").to_numpy(), from_files.column("ood_score").to_numpy(), rtol=1e-6
    )
    assert len(from_arrays.column("z_scores")[0].as_py()) > 0


@pytest.mark.parametrize(("model_type", "rule"), [("vae", "one-sided"), ("ddpm", "full-cov")])
def test_every_built_in_model_and_rule_runs_through_the_pipeline(lake, tmp_path, model_type, rule):
    torch.manual_seed(0)
    model = build_model(model_type, "tiny")
    save_model(model, str(tmp_path / "model"))
    settings = DetectorSettings(rule=rule)
    detector, summary = passes.fit(str(tmp_path / "model"), lake["fit"], passes.PipelineConfig(batch_size=32), settings)
    assert summary.rows == 200 and summary.errors == 0 and detector.per_row.rule_.name == rule
    assert detector.feature_settings == FeatureSettings(engine="auto", batch_size=32)  # what its features had
    detector.save(str(tmp_path / "detector"))
    day = f"{lake['mnist']}/date={DAYS[1]}"
    passes.score(str(tmp_path / "detector"), day, str(tmp_path / "scores"), passes.PipelineConfig(batch_size=32))
    table = read_scores(str(tmp_path / "scores")).sort_by("id")
    source = load_source("mnist", limit=120)
    order = np.argsort(source.ids[70:])
    images, ids = source.images[70:][order], [source.ids[70:][i] for i in order]
    features = compute_features(load_model(str(tmp_path / "model")), images, ids)
    expected = DetectorArtifact.load(str(tmp_path / "detector")).by_group[1].ood_score(features.log_sq_norms)
    # float32 models: batches of 32 (pipeline) and 64 (here) sum in different orders; full-cov magnifies that
    np.testing.assert_allclose(table.column("ood_score").to_numpy(), expected, rtol=1e-5)
