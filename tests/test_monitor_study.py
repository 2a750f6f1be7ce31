"""The monitor's study: nights drawn from feature pools, every method tested the monitor's way, its tables written."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from fimood.apps import monitor_study, study
from fimood.apps.monitor_study import (
    METHODS,
    MonitorStudyConfig,
    pixel_ks_p_value,
    run_monitor_study,
    write_monitor_study,
)


def test_the_pixel_test_is_kolmogorov_smirnov_per_pixel_with_bonferroni():
    rng = np.random.default_rng(0)
    reference, night = rng.integers(0, 256, size=(3000, 2)), rng.integers(0, 256, size=(2000, 2))
    night[:, 1] = np.minimum(night[:, 1] + 8, 255)
    histograms = [monitor_study._pixel_histograms(pixels.astype(np.uint8)) for pixels in (reference, night)]
    expected = [scipy.stats.ks_2samp(night[:, i], reference[:, i], method="asymp").pvalue for i in range(2)]
    assert pixel_ks_p_value(*histograms) == pytest.approx(2 * min(expected), rel=0.05)


def test_a_small_monitor_study_measures_every_method_and_writes_its_tables(tmp_path, monkeypatch):
    real_load_source = study.load_source
    small = lambda name, split="test": real_load_source(name, split, limit=160)  # noqa: E731
    monkeypatch.setattr(study, "load_source", small)
    monkeypatch.setattr(monitor_study, "load_source", small)
    config = MonitorStudyConfig(
        work=str(tmp_path / "work"),
        models=("glow",),
        preset="tiny",
        train_steps=2,
        shares=(0.5,),
        night_rows=(40,),
        null_nights=30,
        power_nights=10,
    )
    result = run_monitor_study(config)
    assert {(e["method"], e["nights"]) for e in result.false_alarms} == {(method, 30) for method in METHODS}
    assert {(e["method"], e["share"], e["nights"]) for e in result.power} == {(m, 0.5, 10) for m in METHODS}
    assert all(0 <= e["flagged"] <= e["nights"] for e in result.false_alarms + result.power)
    assert [(e["method"], e["budget"]) for e in result.lifetime] == [
        (method, budget) for method in ("gradient", "gradient-centred") for budget in (20.0, 365.0)
    ]
    markdown = write_monitor_study(result, str(tmp_path / "docs"), "fimood monitor-study --models glow", 60.0)
    text = Path(markdown).read_text()
    assert "`fimood monitor-study --models glow`" in text and "| glow | 40 |" in text and "| glow | pixels-ks |" in text
    assert [e["model"] for e in result.references] == ["glow"] and 0 <= result.references[0]["pool_layers_p"] <= 1
    assert json.loads((tmp_path / "docs" / "monitoring-study.json").read_text())["config"]["models"] == ["glow"]
