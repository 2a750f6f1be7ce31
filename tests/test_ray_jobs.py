"""`ray job submit --working-dir . -- python jobs/*.py` against the session's Ray head on loopback."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DAYS, RAY_COMMAND, read_scores

REPO = Path(__file__).parents[1]


def submit(address: str, *args: str) -> str:
    """Submit a job and wait for it; the head answers a little before its job agent is ready.

    The job runs with this interpreter (a cluster's image has `python` on its PATH; a bare test PATH may not).
    """
    submit_job = [*RAY_COMMAND, "job", "submit", "--address", address, "--working-dir", "."]
    command = [*submit_job, "--", sys.executable, *args]
    for _ in range(30):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        if "No available agent" not in output:
            break
        time.sleep(2)
    assert result.returncode == 0 and "succeeded" in output, output[-3000:]
    return output


@pytest.mark.slow
def test_fit_and_score_jobs_succeed(ray_session, lake, tmp_path):
    fit_out = submit(
        ray_session,
        "jobs/fit.py",
        "--model",
        lake["model"],
        "--data",
        lake["fit"],
        "--out",
        str(tmp_path / "detector"),
        "--batch-size",
        "32",
    )
    assert "fit: 200 rows (0 errors)" in fit_out
    score_out = submit(
        ray_session,
        "jobs/score.py",
        "--detector",
        str(tmp_path / "detector"),
        "--data",
        lake["mnist"],
        "--out",
        str(tmp_path / "scores"),
    )
    assert "score: 120 rows (0 errors)" in score_out
    table = read_scores(str(tmp_path / "scores"))
    assert table.num_rows == 120 and sorted(set(table.column("partition").to_pylist())) == [f"date={d}" for d in DAYS]
    import ray  # and as a Ray user reads it: Ray Data's Delta reader

    rows = ray.data.read_delta(str(tmp_path / "scores")).select_columns(["partition", "id"]).take_all()
    assert sorted(row["id"] for row in rows) == sorted(table.column("id").to_pylist())
