"""The `fimood` command: help, every subcommand on small inputs, user errors as one line, and the demo."""

import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_scores

from fimood.cli import COMMANDS, build_parser, main
from fimood.models import load_model


def test_help_lists_every_command_and_each_command_has_its_own_help():
    result = subprocess.run([sys.executable, "-m", "fimood.cli", "--help"], capture_output=True, text=True, check=True)
    listed = re.findall(r"^    ([\w-]+)", result.stdout, re.M)
    assert listed == list(COMMANDS) == [
        "data", "train", "fit", "score", "monitor", "evaluate", "study", "monitor-study", "demo", "benchmark",
        "benchmark-pipeline",
        "benchmark-reduce",
        "benchmark-scale",
    ]  # fmt: skip
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for name, module in COMMANDS.items():
        assert subcommands[name].description == module.HELP
        options = {option for action in subcommands[name]._actions for option in action.option_strings}
        assert "--storage-options" in options and "--help" in options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--model", "/no/such/model", "--data", "/no/such/data", "--out", "x"], "no model checkpoint at"),
        (["score", "--detector", "/no/such/detector", "--data", "d", "--out", "o"], "no such file"),
        (["data", "mnist", "--out", "x", "--storage-options", '{"secret": "s3cr3t"'], "is not valid JSON"),
        (["fit", "--model", "m", "--data", "d", "--out", "o", "--calibration-fraction", "2"], "calibration_fraction"),
    ],
)
def test_a_user_error_is_one_line_and_exit_status_2(tmp_path, capsys, argv, message):
    code = _exit_status(lambda: main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err) and "s3cr3t" not in "\n".join(err)


def _exit_status(call) -> int:
    """The exit status of a CLI call, whether it returns it or argparse exits with it."""
    try:
        return call()
    except SystemExit as exit_:
        return exit_.code


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


def test_score_exits_non_zero_naming_the_partitions_it_could_not_commit(lake, tmp_path, capsys):
    bad = tmp_path / "lake" / "date=bad"
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"], "image": [b"junk", b"junk"]}), bad / "part.parquet")
    score = ["score", "--detector", lake["detector"], "--data", str(tmp_path / "lake"), "--out", str(tmp_path / "out")]
    assert main(score) == 1
    assert "date=bad" in capsys.readouterr().err and read_scores(str(tmp_path / "out")).num_rows == 0
    assert main([*score, "--max-error-fraction", "1"]) == 0


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["evaluate", "--detector", "x", "--id-data", "y", "--ood-data", "no-equals-sign"])
    with pytest.raises(SystemExit):
        main(["fit", "--model", "m", "--data", "d", "--out", "o", "--engine", "fast"])


def test_benchmark_pipeline_prints_every_mode_and_its_ratios(ray_session, capsys):
    assert main(["benchmark-pipeline", "--rows", "64", "--preset", "tiny", "--partitions", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for mode in ("in-process", "fit (cold)", "fit (warm)", "score, 1 partition", "score, 4 partitions"):
        assert re.search(rf"^{re.escape(mode)} +64 rows .* rows/s .*x in-process", out, re.M), out
    assert re.search(r"^score, 4 partitions vs 1 partition \(medians\): \d+\.\d\dx$", out, re.M)


@pytest.mark.slow
def test_demo_runs_end_to_end(ray_session, tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--preset", "tiny", "--train-steps", "20"])
    out = capsys.readouterr().out
    assert "test bits/dim" in out and "mnist" in out and "digits" in out
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert {row["group_size"] for row in evaluation["rows"]} == {1, 5}
    scored = re.search(r"scored MNIST through the pipeline: (\d+) rows", out).group(1)
    assert re.search(rf"read back as a Delta table: {scored} rows", out), out
    assert read_scores(str(tmp_path / "scores" / "mnist")).num_rows == int(scored) > 0
    assert "monitor: 7 partitions" in out and (tmp_path / "monitor" / "report" / "index.html").exists()


@pytest.mark.slow
def test_a_local_run_is_quiet(lake, tmp_path):
    """As a new user runs it: a fresh local Ray, token authentication on. No Ray warning, no C++ error line."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    command = [sys.executable, "-m", "fimood.cli", "fit", "--model", lake["model"], "--data", lake["fit"]]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "detector")],
        capture_output=True,
        text=True,
        env={**env, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0 and "fit: 200 rows (0 errors)" in result.stdout, result.stderr[-2000:]
    assert "Token authentication" not in result.stderr and "WARNING" not in result.stderr
    assert not re.search(r"^\[[\d\- :,]+ E \d+", result.stderr, re.M), result.stderr[-2000:]


def test_cli_defaults_are_the_configurations_defaults():
    """Each setting has one home: the configuration dataclass. Every option the CLI derives from one of its
    fields is there, and defaults to the field's default (so `fimood fit` with no option == the library's default)."""
    import dataclasses

    from fimood.method.detector import DetectorSettings
    from fimood.monitor import MonitorConfig
    from fimood.passes import PipelineConfig

    parser = build_parser()
    args = {
        "fit": vars(parser.parse_args(["fit", "--model", "m", "--data", "d", "--out", "o"])),
        "monitor": vars(
            parser.parse_args(
                ["monitor", *(f"--{name}={name}" for name in ("detector", "data", "scores", "history", "report"))]
            )
        ),
    }
    renamed = {"allowed_imports": "allow_import", "false_positive_rate": "fpr"}
    checked = {
        "fit": [PipelineConfig, DetectorSettings],
        "monitor": [PipelineConfig, MonitorConfig],
    }
    for command, configs in checked.items():
        for config in configs:
            for field in dataclasses.fields(config):
                option = renamed.get(field.name, field.name)
                if field.default is dataclasses.MISSING or field.name in ("budget", "pipeline", "partitions"):
                    continue
                assert option in args[command], f"fimood {command} has no option for {config.__name__}.{field.name}"
                given = args[command][option]
                assert (tuple(given) if isinstance(given, list) else given) == field.default, (command, field.name)
