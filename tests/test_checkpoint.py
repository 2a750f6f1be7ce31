"""Checkpoints: config.json + model.safetensors, anywhere fsspec reaches."""

import json

import pytest
import torch
from conftest import tiny_glow

from fimood.models import base, load_model, save_model


@pytest.mark.parametrize("root", ["memory://models/glow", "local"])
def test_save_load_round_trip_gives_identical_nll(root, tmp_path):
    url = str(tmp_path / "glow") if root == "local" else root
    model = tiny_glow(dtype=torch.float32)
    sha = save_model(model, url)
    loaded = load_model(url)
    loaded_sha = loaded.checkpoint_sha256
    x, seeds = torch.rand(3, 1, 8, 8), torch.arange(3)
    torch.testing.assert_close(loaded.nll(x, seeds), model.nll(x, seeds), rtol=0, atol=0)
    assert loaded_sha == sha and not loaded.training


def test_checkpoint_holds_no_pickle(tmp_path):
    save_model(tiny_glow(dtype=torch.float32), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "glow" and config["config"]["image_shape"] == [1, 8, 8]


def test_unknown_model_type_is_refused(tmp_path):
    save_model(tiny_glow(dtype=torch.float32), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "mystery"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type must be one of .* got 'mystery'"):
        load_model(str(tmp_path))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path / "absent"))


def test_a_checkpoint_is_marked_present_only_once_its_weights_are_written(tmp_path, monkeypatch):
    written = []
    real_write = base.write_bytes

    def record(url, data, storage_options=None):
        written.append(url.rsplit("/", 1)[-1])
        if written[-1] == "config.json":
            raise KeyboardInterrupt("killed before the marker")
        real_write(url, data, storage_options)

    monkeypatch.setattr(base, "write_bytes", record)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_glow(dtype=torch.float32), str(tmp_path))
    assert written == ["model.safetensors", "config.json"]
    with pytest.raises(FileNotFoundError, match="no model checkpoint at"):
        load_model(str(tmp_path))
