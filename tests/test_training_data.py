"""A checkpoint records what fimood trained it on, and `fit` counts the rows of its reference that the model
was trained on: `fimood train --id-hash-range` leaves the rest of a table unseen."""

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from conftest import small_detector

from fimood import passes
from fimood.cli import main
from fimood.lake.tables import write_image_parquet
from fimood.method.detector import DetectorArtifact, training_rows_in_fit
from fimood.method.reduce import FitReduce
from fimood.method.splits import calibration_rows, training_hash, training_rows
from fimood.models import MODELS, build_model, load_model, save_model, training_data_record
from fimood.models.base import TRAINING_DATA_NAME
from fimood.models.training import TrainConfig
from fimood.onboarding import training
from fimood.onboarding.datasets import load_source
from fimood.onboarding.training import train_checkpoint

RANGE = (0.0, 0.75)


def write_table(url: str, rows: int = 200) -> list[str]:
    source = load_source("fashion-mnist", "train", limit=rows)
    write_image_parquet(url, source.ids, source.images, rows_per_shard=50)
    return source.ids


def in_range(ids: list[str], id_hash_range=RANGE) -> list[str]:
    return [i for i, keep in zip(ids, training_rows(ids, id_hash_range), strict=True) if keep]


def test_train_with_an_id_hash_range_trains_on_those_rows_and_the_checkpoint_records_them(
    tmp_path, capsys, monkeypatch
):
    data, out = tmp_path / "table", tmp_path / "model"
    ids = write_table(str(data))
    trained_on, real_train = [], training.train

    def train_recording_its_rows(model, images, *args, **kwargs):
        trained_on.append(images)
        return real_train(model, images, *args, **kwargs)

    monkeypatch.setattr(training, "train", train_recording_its_rows)
    train = ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--data", str(data), "--out", str(out)]
    assert main([*train, "--id-hash-range", "0", "0.75"]) == 0
    expected = in_range(ids)
    assert 0.65 < len(expected) / len(ids) < 0.85 and len(trained_on[0]) == len(expected)
    assert f"trained 2 steps on {len(expected)} rows" in capsys.readouterr().out
    record = json.loads((out / TRAINING_DATA_NAME).read_text())
    assert record == {
        "format": "fimood-training-data",
        "format_version": 1,
        "data": str(data),
        "id_hash_range": [0.0, 0.75],
        "rows": len(expected),
        "ids_sha256": hashlib.sha256("\n".join(sorted(expected)).encode()).hexdigest(),
    }
    assert load_model(str(out)).training_data == record


def test_an_id_hash_range_outside_0_1_is_one_clear_error(tmp_path, capsys):
    train = ["train", "--preset", "tiny", "--steps", "2", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]
    assert main([*train, "--id-hash-range", "0.5", "0.5"]) == 2
    assert "id_hash_range must be (low, high) with 0 <= low < high <= 1, got (0.5, 0.5)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"id_hash_range must be .* got \(-0\.1, 1\.0\)"):
        train_checkpoint(str(tmp_path / "none"), str(tmp_path / "model"), id_hash_range=(-0.1, 1.0))


def test_the_training_hash_is_independent_of_the_calibration_split():
    ids = [f"row-{index}" for index in range(20_000)]
    held_out_to_calibrate = calibration_rows(ids, 0.2)
    assert abs(held_out_to_calibrate[training_hash(ids) < 0.75].mean() - 0.2) < 0.015


def model_with_record(name: str):
    torch.manual_seed(0)
    model = build_model(name, "tiny", (1, 8, 8) if name == "ddpm" else None)
    model.training_data = training_data_record("memory://lake/train", RANGE, ["b", "a"])
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_record_survives_load_and_the_checkpoint_hash_covers_it(tmp_path, name):
    model = model_with_record(name)
    sha256 = save_model(model, str(tmp_path / "model"))
    loaded = load_model(str(tmp_path / "model"))
    assert loaded.training_data == model.training_data and loaded.checkpoint_sha256 == sha256
    assert loaded.training_data["ids_sha256"] == hashlib.sha256(b"a\nb").hexdigest()
    record_file = tmp_path / "model" / TRAINING_DATA_NAME
    record_file.write_text(json.dumps({**loaded.training_data, "rows": 1}))
    assert load_model(str(tmp_path / "model")).checkpoint_sha256 != sha256


@pytest.mark.parametrize("name", ["glow", "ddpm"])
def test_a_checkpoint_without_a_record_has_none_and_keeps_its_hash(tmp_path, name):
    model = model_with_record(name)
    save_model(model, str(tmp_path / "model"))
    model.training_data = None  # saved again by in-process code, into the same folder: the stale record goes
    sha256 = save_model(model, str(tmp_path / "model"))
    assert not (tmp_path / "model" / TRAINING_DATA_NAME).exists()
    loaded = load_model(str(tmp_path / "model"))
    assert loaded.training_data is None and loaded.checkpoint_sha256 == sha256
    assert training_rows_in_fit(small_detector({"fit_data": "/lake/fit"})) is None  # a fit from before the check
    assert training_rows_in_fit(small_detector({"training_rows_in_fit": None, "training_data": None})) is None


@pytest.mark.parametrize("name", ["glow", "ddpm"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"format": "fimood-training-data", "rows": ', "is not valid JSON"),
        (
            json.dumps({"format": "fimood-training-data", "format_version": 99}).encode(),
            "format_version must be 1, got 99",
        ),
        (b'{"rows": 3}', "expected a 'fimood-training-data' record"),
    ],
)
def test_a_damaged_or_future_record_is_one_error_naming_the_file(tmp_path, name, content, message):
    save_model(model_with_record(name), str(tmp_path / "model"))
    (tmp_path / "model" / TRAINING_DATA_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{tmp_path}/model/fimood_training\.json.*{message}"):
        load_model(str(tmp_path / "model"))


def test_the_fit_reduce_counts_only_ids_in_the_training_range():
    ids = [f"row-{index}" for index in range(400)]
    rest = [i for i in ids if i not in set(in_range(ids))]
    features, nll = np.random.default_rng(0).normal(size=(400, 3)), np.zeros(400)
    counting = FitReduce(3, 0.2, training_id_hash_range=RANGE)
    counting.add(ids, features, nll)
    counting.add(rest, features[: len(rest)], nll[: len(rest)])
    assert counting.training_rows == len(in_range(ids)) > 0
    unrelated = FitReduce(3, 0.2)
    unrelated.add(ids, features, nll)
    assert unrelated.training_rows == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Glow trained on the rows of a two-partition table whose id hash lies in [0, 0.75)."""
    root = tmp_path_factory.mktemp("trained")
    source = load_source("fashion-mnist", "train", limit=160)
    for day, rows in (("date=1", slice(0, 80)), ("date=2", slice(80, 160))):
        write_image_parquet(str(root / "table" / day), source.ids[rows], source.images[rows], rows_per_shard=40)
    config = TrainConfig(steps=2, batch_size=8, warmup_steps=1)
    train_checkpoint(
        str(root / "table"),
        str(root / "model"),
        preset="tiny",
        train_config=config,
        id_hash_range=RANGE,
        progress=False,
    )
    return root, source


def fit_on(root, data_url: str, caplog) -> DetectorArtifact:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fimood.passes.fit_pass"):
        detector, summary = passes.fit(str(root / "model"), data_url, passes.PipelineConfig(batch_size=40))
    assert summary.errors == 0
    detector.save(str(root / "detector"))
    return DetectorArtifact.load(str(root / "detector"))


def test_a_fit_on_the_training_table_counts_its_training_rows_and_warns(ray_session, trained, caplog):
    root, source = trained
    record = load_model(str(root / "model")).training_data
    detector = fit_on(root, str(root / "table"), caplog)
    training_rows = len(in_range(source.ids))
    assert training_rows_in_fit(detector) == record["rows"] == training_rows < len(source.ids)
    assert detector.extra["training_data"] == record
    (warning,) = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    share = f"{100 * training_rows / len(source.ids):.1f}%"
    assert f"{training_rows} of 160 rows ({share})" in warning and str(root / "table") in warning
    assert "--id-hash-range 0 0.75" in warning and "\n" not in warning
    # a partition inside the training table: its own rows in the range
    detector = fit_on(root, str(root / "table" / "date=2"), caplog)
    assert training_rows_in_fit(detector) == len(in_range(source.ids[80:])) > 0


def test_a_fit_on_a_table_of_the_rest_counts_none(ray_session, trained, caplog):
    """The rows outside the range, written to a table of their own (ids kept): the realistic held-out reference."""
    root, source = trained
    rest = ~training_rows(source.ids, RANGE)
    ids = [i for i, keep in zip(source.ids, rest, strict=True) if keep]
    write_image_parquet(str(root / "rest"), ids, source.images[rest])
    detector = fit_on(root, str(root / "rest"), caplog)
    assert training_rows_in_fit(detector) == 0 and detector.extra["training_data"]["rows"] == 160 - len(ids)
    assert not [r for r in caplog.records if "trained on" in r.getMessage()]
