"""The cluster configs parse, name the fields their tools need, and call jobs with flags the CLI accepts."""

import shlex
from pathlib import Path

import pytest
import yaml

from fimood.cli import build_parser

CLUSTER = Path(__file__).parents[1] / "cluster"


def load_all(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def test_cluster_launcher_has_a_gpu_worker_group():
    config = load_all("ray-cluster.yaml")[0]
    assert config["head_node_type"] in config["available_node_types"]
    gpu_groups = [group for group in config["available_node_types"].values() if group["resources"].get("GPU")]
    assert gpu_groups and gpu_groups[0]["max_workers"] >= 1
    assert any("ray start --head" in command for command in config["head_start_ray_commands"])


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("kuberay/rayjob-fit.yaml", "fit"),
        ("kuberay/rayjob-score.yaml", "score"),
        ("kuberay/rayjob-monitor.yaml", "monitor"),
    ],
)
def test_rayjobs_run_a_job_script_with_valid_flags_on_gpu_workers(name, command):
    (job,) = load_all(name)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", f"jobs/{command}.py"] and (CLUSTER.parent / argv[1]).exists()
    build_parser().parse_args([command, *argv[2:]])  # exits on an unknown or missing flag
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    secrets = [
        source["secretRef"]["name"]
        for source in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"]
    ]
    assert secrets == ["fimood-s3"] and "secret" not in job["spec"]["entrypoint"].lower()


def test_nightly_schedule_submits_the_monitor_job_with_history_and_report():
    cron, *rbac = load_all("kuberay/nightly-monitor.yaml")
    assert cron["kind"] == "CronJob" and len(cron["spec"]["schedule"].split()) == 5
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1].endswith("rayjob-monitor.yaml")
    entrypoint = load_all("kuberay/rayjob-monitor.yaml")[0]["spec"]["entrypoint"]
    assert "--history" in entrypoint and "--report" in entrypoint
    role = next(item for item in rbac if item["kind"] == "Role")
    assert role["rules"][0]["resources"] == ["rayjobs"]
