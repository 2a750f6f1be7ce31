"""In-process train → fit → score → evaluate on small real data: DESIGN.md's promises for the score table."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fimood.data import load_source
from fimood.detector import Detector, DetectorSettings
from fimood.evaluate import evaluate, format_table
from fimood.features import compute_features, seeds_from_ids
from fimood.io import encode_png, read_parquet_table, write_image_parquet
from fimood.models import load_model, save_model
from fimood.train import TrainConfig
from fimood.workflow import calibration_mask, fit_detector, score, train_checkpoint


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """Demo tables and a tiny Glow trained on FashionMNIST, with a detector fitted on other rows."""
    root = tmp_path_factory.mktemp("lake")
    fashion = load_source("fashion-mnist", "test", limit=700)
    mnist = load_source("mnist", limit=200)
    urls = {
        "train": str(root / "train"),
        "fit": str(root / "fit"),
        "id": str(root / "id"),
        "mnist": str(root / "mnist"),
    }
    write_image_parquet(urls["train"], fashion.ids[:300], fashion.images[:300])
    write_image_parquet(urls["fit"], fashion.ids[300:500], fashion.images[300:500])
    write_image_parquet(urls["id"], fashion.ids[500:], fashion.images[500:])
    write_image_parquet(urls["mnist"], mnist.ids, mnist.images, rows_per_shard=64)
    urls["model"] = str(root / "model")
    summary = train_checkpoint(
        urls["train"],
        urls["model"],
        preset="tiny",
        test_data_url=urls["id"],
        train_config=TrainConfig(steps=30, batch_size=32),
    )
    assert np.isfinite(summary.test_bits_per_dim)
    urls["detector"] = str(root / "detector")
    fit_detector(urls["model"], urls["fit"], DetectorSettings(group_sizes=(1, 5), batch_size=32)).save(urls["detector"])
    return urls


def test_rows_in_equal_rows_out(lake, tmp_path):
    summary = score(lake["detector"], lake["mnist"], str(tmp_path))
    table = read_parquet_table(str(tmp_path))
    assert summary.rows == table.num_rows == 200
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == 200 and ids == load_source("mnist", limit=200).ids
    assert table.column_names == ["id", "ood_score", "p_value", "is_ood", "nll", "error", "detector_id"]
    assert table.column("error").null_count == 200
    assert set(table.column("detector_id").to_pylist()) == {Detector.load(lake["detector"]).detector_id}


def test_bad_rows_come_out_with_an_error_and_no_score(lake, tmp_path):
    good = encode_png(load_source("mnist", limit=1).images[0])
    rows = {
        "id": ["ok", "corrupt", "missing", "wrong-size"],
        "image": [good, b"\x89PNG broken", None, encode_png(np.zeros((1, 8, 8), np.uint8))],
    }
    pq.write_table(pa.table(rows), tmp_path / "in.parquet")
    summary = score(lake["detector"], str(tmp_path / "in.parquet"), str(tmp_path / "out"))
    table = read_parquet_table(str(tmp_path / "out")).to_pylist()
    assert summary.rows == 4 and summary.errors == 3
    assert [row["id"] for row in table] == rows["id"]
    assert table[0]["error"] is None and np.isfinite(table[0]["ood_score"])
    for row, reason in zip(table[1:], ["cannot be decoded", "missing", "28x28"], strict=True):
        assert reason in row["error"] and row["ood_score"] is None and row["is_ood"] is None


def test_batch_size_does_not_change_score(lake):
    model = load_model(lake["model"])
    source = load_source("mnist", limit=20)
    seeds = seeds_from_ids(source.ids)
    reference = compute_features(model, source.images, seeds, batch_size=64).log_sq_norms
    for batch_size in (1, 7):
        features = compute_features(model, source.images, seeds, batch_size=batch_size).log_sq_norms
        np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-5)


def test_scores_are_deterministic_across_runs(lake, tmp_path):
    score(lake["detector"], lake["mnist"], str(tmp_path / "a"))
    score(lake["detector"], lake["mnist"], str(tmp_path / "b"))
    a, b = read_parquet_table(str(tmp_path / "a")), read_parquet_table(str(tmp_path / "b"))
    assert a.equals(b)


def test_a_rerun_replaces_the_output_instead_of_adding_rows(lake, tmp_path):
    score(lake["detector"], lake["mnist"], str(tmp_path))
    score(lake["detector"], lake["mnist"], str(tmp_path))
    assert read_parquet_table(str(tmp_path)).num_rows == 200


def test_a_model_changed_since_the_fit_is_refused(lake, tmp_path):
    model = load_model(lake["model"])
    detector = Detector.load(lake["detector"])
    with torch.no_grad():
        model.top_prior.value.add_(1.0)
    detector.model_uri = str(tmp_path / "model")
    save_model(model, detector.model_uri)
    detector.save(str(tmp_path / "detector"))
    with pytest.raises(ValueError, match="changed since the detector was fitted"):
        score(str(tmp_path / "detector"), lake["mnist"], str(tmp_path / "out"))


def test_calibration_split_is_stable_and_near_the_fraction():
    ids = [f"row-{i}" for i in range(5000)]
    mask = calibration_mask(ids, 0.2)
    assert mask.mean() == pytest.approx(0.2, abs=0.02)
    assert (calibration_mask(ids[::-1], 0.2)[::-1] == mask).all()


def test_evaluate_reports_every_method_and_group_size(lake):
    rows = evaluate(lake["detector"], lake["id"], {"mnist": lake["mnist"]})
    assert {(row.method, row.group_size) for row in rows} == {
        (m, g) for m in ("gradient", "typicality", "likelihood") for g in (1, 5)
    }
    assert all(0 <= row.auroc <= 1 for row in rows)
    assert "mnist" in format_table(rows)
