"""The monitor's study: its design is a deployment's (one reference, fresh disjoint nights, no training
row anywhere), every method tests every night, and its tables are written."""

import json
from pathlib import Path

import numpy as np

from fimood.method.reduce import FitReduce
from fimood.method.splits import training_rows
from fimood.models import load_model
from fimood.onboarding.datasets import load_source
from fimood.research import monitor_study, study
from fimood.research.monitor_study import (
    METHODS,
    MonitorStudyConfig,
    fresh_rows,
    plan_deployment,
    run_monitor_study,
    threshold_rows,
    write_monitor_study,
)


def test_the_models_train_on_at_most_45000_rows_and_leave_at_least_15000_fresh():
    unseen = fresh_rows(load_source("fashion-mnist", "train").ids, MonitorStudyConfig().trained_share)
    assert unseen.sum() >= 15_000 and (~unseen).sum() <= 45_000


def test_a_deployments_nights_are_disjoint_fresh_rows_apart_from_its_fit_rows():
    config = MonitorStudyConfig(fit_rows=500, night_rows=(100, 1000), nights=(5, 2))
    plan = plan_deployment(np.random.default_rng(0), 3000, 1000, config)
    nights = [night for rows in config.night_rows for night in plan.nights[rows]]
    every = np.concatenate([plan.fit, *nights])
    assert len(every) == len(set(every.tolist())) == 500 + 5 * 100 + 2 * 1000  # no row twice: fit or night
    assert [len(n) for n in plan.nights[100]] == [100] * 5
    for (rows, share), drawn in plan.mnist.items():
        mnist = np.concatenate(drawn)
        assert len(mnist) == len(set(mnist.tolist())) == round(share * rows) * len(plan.nights[rows])
        night = plan.night(rows, 0, share)
        assert len(night["fresh"]) + len(night["mnist"]) == rows and set(night["fresh"]) <= set(plan.nights[rows][0])


def test_the_nll_monitor_calibrates_on_the_rows_that_set_the_detectors_threshold():
    rng = np.random.default_rng(1)
    ids = [f"row-{i}" for i in range(600)]
    features = rng.normal(size=(600, 3))
    reduce = FitReduce(3, 0.2)
    reduce.add(ids, features, features[:, 0])
    detector, _ = reduce.finish(0.05)
    np.testing.assert_allclose(
        np.sort(detector.ood_score(features[threshold_rows(ids, 0.2)])), detector.calibration_scores_
    )


def test_a_small_monitor_study_measures_every_method_and_writes_its_tables(tmp_path, monkeypatch):
    real_load_source = study.load_source
    small = lambda name, split="test": real_load_source(name, split, limit=300)  # noqa: E731
    monkeypatch.setattr(study, "load_source", small)
    monkeypatch.setattr(monitor_study, "load_source", small)
    config = MonitorStudyConfig(
        work=str(tmp_path / "work"),
        models=("glow",),
        preset="tiny",
        train_steps=2,
        references=3,
        fit_rows=150,
        night_rows=(40,),
        nights=(2,),
        shares=(0.5,),
        classifier_steps=5,
    )
    result = run_monitor_study(config)
    tables = monitor_study.summarise(result)
    assert {(e["method"], e["share"], e["nights"]) for e in tables["rates"]} == {
        (method, share, 3 * 2) for method in METHODS for share in (0.0, 0.5)
    }
    assert all(e["references"] == 3 for e in tables["per_reference"])
    markdown = write_monitor_study(result, str(tmp_path / "docs"), "fimood monitor-study --models glow", 60.0)
    text = Path(markdown).read_text()
    assert "`fimood monitor-study --models glow`" in text and "| glow | 40 |" in text and "| glow | mmd |" in text
    assert json.loads((tmp_path / "docs" / "monitoring-study.json").read_text())["config"]["models"] == ["glow"]
    again = run_monitor_study(config)  # the features are cached by checkpoint; the outcomes are the same
    assert again.outcomes == result.outcomes
    model = load_model(str(tmp_path / "work" / "models" / "glow-ids-0-0.74"))
    recorded = model.training_data  # what the checkpoint says it trained on: none of the fresh rows
    assert recorded["id_hash_range"] == [0.0, 0.74] and recorded["data"].endswith("fashion-mnist-train")
    train_ids = small("fashion-mnist", "train").ids
    fresh_train_ids = [i for i, keep in zip(train_ids, fresh_rows(train_ids, 0.74), strict=True) if keep]
    assert fresh_train_ids and not training_rows(fresh_train_ids, recorded["id_hash_range"]).any()
