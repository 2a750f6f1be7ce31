"""Several Ray nodes on one machine (Ray's own harness, `ray.cluster_utils.Cluster`): a head that offers
no CPU, as the shipped configs have it, and worker raylets. A worker node lost mid-pass costs no row; a
replica placed on a GPU its torch cannot use stops the run in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from conftest import TESTS, read_scores
from ray.cluster_utils import Cluster

from fimood.onboarding.datasets import load_source

CLI = "import sys; from fimood.cli import main; sys.exit(main(sys.argv[1:]))"
NODE = {"num_cpus": 1, "object_store_memory": 80_000_000}


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPU for actors and three one-CPU worker nodes, as subprocesses of this test."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80_000_000})
    workers = [nodes.add_node(**NODE) for _ in range(3)]
    nodes.wait_for_nodes()
    yield nodes, workers
    nodes.shutdown()


def score_command(lake, out: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-c", CLI, "score", "--detector", lake["detector"], "--data", lake["mnist"]]
    return [*command, "--out", str(out), "--batch-size", "8", *extra]


def run_env(nodes: Cluster) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": nodes.address, "PYTHONPATH": TESTS}


def node_of_the_replica(workers) -> object | None:
    """The worker node whose raylet runs a model replica (a `MapWorker` actor process), if one is up yet."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in workers if node.all_processes}
    for process in psutil.process_iter(["cmdline", "ppid"]):
        if "MapWorker" in " ".join(process.info["cmdline"] or []) and process.info["ppid"] in raylets:
            return raylets[process.info["ppid"]]
    return None


def test_a_worker_node_lost_mid_pass_costs_no_row(cluster, lake, tmp_path):
    """The node running the model replica dies while rows are in flight (a preempted spot node) and a new
    node joins, as an autoscaler brings one: the pass ends well, every input row once."""
    nodes, workers = cluster
    out = tmp_path / "out"
    job = subprocess.Popen(
        score_command(lake, out), env=run_env(nodes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline, victim = time.monotonic() + 180, None
    while victim is None or not list(out.glob("partition=*/*.parquet")):
        assert job.poll() is None, job.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no replica and data file appeared"
        victim = victim or node_of_the_replica(workers)
        time.sleep(0.05)
    nodes.remove_node(victim, allow_graceful=False)
    workers.remove(victim)
    workers.append(nodes.add_node(**NODE))
    output = job.communicate(timeout=300)[0].decode()
    assert job.returncode == 0, output[-3000:]
    ids = read_scores(str(out)).column("id").to_pylist()
    assert Counter(ids) == Counter(load_source("mnist", limit=120).ids), "every row exactly once"


def test_a_replica_given_a_gpu_its_torch_cannot_use_stops_the_run_in_one_line(cluster, lake, tmp_path):
    """A GPU node joins (Ray sees a GPU; this machine's torch is a CPU build): replicas ask for GPUs by
    default, land there, and the run stops with one line instead of scoring on the CPU while holding it."""
    nodes, _ = cluster
    gpu_node = nodes.add_node(num_cpus=1, num_gpus=1, object_store_memory=80_000_000)
    try:
        nodes.wait_for_nodes()
        result = subprocess.run(
            score_command(lake, tmp_path / "out"), env=run_env(nodes), capture_output=True, text=True, timeout=300
        )
    finally:
        nodes.remove_node(gpu_node)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        last.startswith("fimood score: error: a model replica was given GPU 0 but its torch")
        and "cannot use CUDA" in last
    )
    assert "--gpus-per-actor 0" in last
