"""The `fimood` command: help, every subcommand on small inputs, and the demo."""

import json
import subprocess
import sys

import pytest

from fimood.cli import main
from fimood.models import load_model


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "fimood.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("data", "train", "fit", "score", "evaluate", "study", "demo", "benchmark"):
        assert command in result.stdout


def test_data_train_fit_score_evaluate(ray_session, tmp_path, capsys):
    d = str(tmp_path)
    main(["data", "fashion-mnist", "--out", f"{d}/train", "--limit", "200"])
    main(["data", "fashion-mnist", "--out", f"{d}/fit", "--split", "test", "--limit", "150"])
    main(["data", "digits", "--out", f"{d}/digits", "--limit", "60"])
    main(
        [
            "train",
            "--data",
            f"{d}/train",
            "--out",
            f"{d}/model",
            "--preset",
            "tiny",
            "--epochs",
            "1",
            "--batch-size",
            "50",
            "--test-data",
            f"{d}/fit",
        ]
    )
    assert "trained 4 steps" in capsys.readouterr().out
    main(["fit", "--model", f"{d}/model", "--data", f"{d}/fit", "--out", f"{d}/det", "--batch-size", "32"])
    assert "features kept" in capsys.readouterr().out
    main(["score", "--detector", f"{d}/det", "--data", f"{d}/digits", "--out", f"{d}/scores", "--features"])
    assert "score: 60 rows (0 errors)" in capsys.readouterr().out
    evaluate = ["evaluate", "--detector", f"{d}/det", "--id-data", f"{d}/fit", "--ood-data", f"digits={d}/digits"]
    main([*evaluate, "--group-sizes", "1", "5", "--out", f"{d}/eval.json"])
    assert "gradient AUROC" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "eval.json").read_text())["rows"]) == 6


@pytest.mark.parametrize(("model", "unit"), [("vae", "bits/dim (-ELBO)"), ("ddpm", "weighted noise error")])
def test_train_builds_every_model_type(tmp_path, capsys, model, unit):
    data = f"{tmp_path}/train"
    main(["data", "fashion-mnist", "--out", data, "--limit", "40"])
    train = ["train", "--model", model, "--preset", "tiny", "--steps", "2", "--batch-size", "8"]
    main([*train, "--data", data, "--out", f"{tmp_path}/model", "--test-data", data])
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and f"{unit}; saved to" in out
    assert load_model(f"{tmp_path}/model").model_type == model


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["evaluate", "--detector", "x", "--id-data", "y", "--ood-data", "no-equals-sign"])
    with pytest.raises(SystemExit):
        main(["fit", "--model", "m", "--data", "d", "--out", "o", "--method", "fast"])


@pytest.mark.slow
def test_demo_runs_end_to_end(ray_session, tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--preset", "tiny", "--train-steps", "20"])
    out = capsys.readouterr().out
    assert "test bits/dim" in out and "mnist" in out and "digits" in out
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert {row["group_size"] for row in evaluation["rows"]} == {1, 5}
    assert (tmp_path / "scores" / "mnist" / "_SUCCESS").exists()
