"""Nothing read from storage is ever unpickled: a pickle planted under every name a loader reads is refused
with one error naming the file, and its payload never runs. Half-written and future checkpoints likewise."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import small_detector, tiny_glow

from fimood.lake.score_table import read_scores
from fimood.method.detector import DetectorArtifact
from fimood.models import DDPM, load_model, save_model
from fimood.monitor.history import read_history


class Payload:
    """Unpickling this creates `path`: the sign that a loader ran code from storage."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(target: Path, sentinel: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pickle.dumps(Payload(sentinel)))


def test_the_planted_payload_runs_when_unpickled(tmp_path):
    """The control: the payload is live, so a loader that unpickled it would be caught."""
    plant(tmp_path / "x.pkl", tmp_path / "payload-ran")
    pickle.loads((tmp_path / "x.pkl").read_bytes())
    assert (tmp_path / "payload-ran").exists()


def glow_folder(root: Path) -> Path:
    save_model(tiny_glow(dtype=torch.float32), str(root))
    return root


def ddpm_folder(root: Path) -> Path:
    torch.manual_seed(0)
    save_model(DDPM.from_preset("tiny", (1, 8, 8)), str(root))
    return root


def detector_folder(root: Path) -> Path:
    small_detector().save(str(root))
    return root


LOADERS = {
    "model": (glow_folder, lambda url: load_model(url)),
    "ddpm": (ddpm_folder, lambda url: load_model(url)),
    "detector": (detector_folder, lambda url: DetectorArtifact.load(url)),
}
# (what, file replaced by a pickle, file removed first so a loader might look for the pickle instead)
PLANTS = [
    ("model", "config.json", None),
    ("model", "model.safetensors", None),
    ("model", "pytorch_model.bin", "model.safetensors"),
    ("model", "fimood_training.json", None),
    ("ddpm", "model_index.json", None),
    ("ddpm", "fimood.json", None),
    ("ddpm", "fimood_training.json", None),
    ("ddpm", "unet/config.json", None),
    ("ddpm", "unet/diffusion_pytorch_model.safetensors", None),
    ("ddpm", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors"),
    ("ddpm", "scheduler/scheduler_config.json", None),
    ("detector", "manifest.json", None),
    ("detector", "arrays.safetensors", None),
]


@pytest.mark.parametrize(("what", "name", "removed"), PLANTS, ids=[f"{w}:{n}" for w, n, _ in PLANTS])
def test_a_pickle_planted_under_a_loaded_name_is_refused_and_never_run(tmp_path, what, name, removed):
    make, load = LOADERS[what]
    folder, sentinel = make(tmp_path / what), tmp_path / "payload-ran"
    if removed:
        (folder / removed).unlink()
    plant(folder / name, sentinel)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load(str(folder))
    assert not sentinel.exists()
    assert Path(name).name in str(error.value) or str(folder) in str(error.value)


def test_pickles_planted_in_an_output_and_a_history_are_refused_and_never_run(tmp_path):
    sentinel = tmp_path / "payload-ran"
    plant(tmp_path / "delta" / "_delta_log" / "00000000000000000000.json", sentinel)  # a table's first version
    with pytest.raises(Exception, match=r"(?i)json|parse|invalid"):
        read_scores(str(tmp_path / "delta"))
    plant(tmp_path / "legacy" / "date=1" / "_SUCCESS", sentinel)  # an output of fimood 0.2, never opened
    with pytest.raises(ValueError, match=r"fimood 0\.2"):
        read_scores(str(tmp_path / "legacy"))
    plant(tmp_path / "history" / "stream=x" / "0123456789abcdef0123.parquet", sentinel)  # a row file of fimood 0.2
    with pytest.raises(ValueError, match=r"fimood 0\.2"):
        read_history(str(tmp_path / "history"), "x")
    assert not sentinel.exists()


def test_a_half_written_checkpoint_is_one_clear_error(tmp_path):
    """Weights cut short (a copy killed halfway) are named, with the fix; the same for a detector's arrays."""
    folder = glow_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file .*save the model"):
        load_model(str(folder))
    detector = detector_folder(tmp_path / "detector")
    arrays = detector / "arrays.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"arrays\.safetensors is not a readable safetensors file .*fit the detector"):
        DetectorArtifact.load(str(detector))
    ddpm = ddpm_folder(tmp_path / "ddpm")
    unet = ddpm / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"not a loadable ddpm checkpoint .*save the model again"):
        load_model(str(ddpm))


def test_a_checkpoint_from_a_future_fimood_is_refused(tmp_path):
    folder = glow_folder(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match=r"config\.json: format_version must be 1, got 99 \(a newer fimood"):
        load_model(str(folder))
