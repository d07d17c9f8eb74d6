"""Issue 11, multi-node simulation: fractional-GPU model replicas pack onto one GPU node and autoscale onto another.

``tests/cluster/multinode_scenario.py`` (its docstring has the setup and the settings it
needs) runs in a subprocess: it starts its own three-node ``ray.cluster_utils.Cluster``,
and one process cannot join two clusters while this pytest process may already hold the
integration suite's. It prints its findings as one JSON object on its last stdout line;
the tests below assert on them. The whole run takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 400
GPU_NODES = {"gpu_a", "gpu_b"}


@pytest.fixture(scope="module")
def findings() -> Iterator[dict[str, Any]]:
    """Run the scenario once for the module; yield its findings."""
    # A short private temp dir (Ray's socket paths live under it) that also keeps the
    # scenario's address file away from any other cluster on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="rgmn-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "tests.cluster.multinode_scenario"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the scenario and what it started
        out, err = proc.communicate()
        pytest.fail(f"the scenario ran over {SCENARIO_TIMEOUT_S} s (Ray logs: {ray_tmp});\n"
                    f"stdout tail:\n{out[-3000:]}\nstderr tail:\n{err[-3000:]}")
    lines = out.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"no JSON findings (rc {proc.returncode}, Ray logs: {ray_tmp});\n"
                    f"stdout tail:\n{out[-3000:]}\nstderr tail:\n{err[-3000:]}")
    assert proc.returncode == 0 and "error" not in result, (
        f"scenario failed (rc {proc.returncode}, Ray logs: {ray_tmp}):\n{result.get('error')}\n"
        f"findings: {json.dumps({k: v for k, v in result.items() if k != 'error'})}\nstderr tail:\n{err[-3000:]}")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    yield result


def test_cluster_is_a_cpu_head_and_two_one_gpu_nodes(findings: dict[str, Any]) -> None:
    assert findings["nodes"]["cpu_head"]["GPU"] == 0
    assert {name: node["GPU"] for name, node in findings["nodes"].items() if name != "cpu_head"} == {
        "gpu_a": 1, "gpu_b": 1}


def test_idle_replicas_share_one_gpu_node(findings: dict[str, Any]) -> None:
    """Two half-GPU replicas, no load: packed onto one GPU node, the other node's GPU left free."""
    idle = findings["idle"]["running_per_node"]
    assert len(idle) == 1 and set(idle) <= GPU_NODES and list(idle.values()) == [2], findings["idle"]
    (packed,) = idle
    (other,) = GPU_NODES - {packed}
    # Ray core's own accounting agrees with Serve's.
    assert findings["idle"]["gpu_free_per_node"] == {packed: 0.0, other: 1.0}


def test_load_scales_out_onto_the_other_gpu_node(findings: dict[str, Any]) -> None:
    """Under load the autoscaler goes to 4 replicas; the 2 new ones can only fit, and land, on the other node."""
    idle_nodes = set(findings["idle_replicas_nodes"])
    assert len(idle_nodes) == 1, findings["idle_replicas_nodes"]
    added = findings["added_replicas_nodes"]
    assert len(added) == 2 and not idle_nodes & set(added) and len(set(added)) == 1, added
    assert findings["peak"]["target"] == 4
    assert findings["peak"]["running_per_node"] == {"gpu_a": 2, "gpu_b": 2}
    assert findings["peak"]["gpu_free_per_node"] == {"gpu_a": 0.0, "gpu_b": 0.0}
    assert findings["load"]["stopped_because"] == "all replicas served", findings["load"]
    timeline = findings["timeline"]
    assert max(s["states"].get("RUNNING", 0) for s in timeline if "states" in s) == 4
    assert all(n <= 2 for s in timeline for n in s.get("running_per_node", {}).values()), timeline
    timings = findings["timings_s"]
    assert timings["to_first_upscale_decision"] is not None
    assert timings["to_all_replicas_running"] is not None
    assert timings["to_first_upscale_decision"] <= timings["to_all_replicas_running"]


def test_scales_back_down_to_one_packed_node(findings: dict[str, Any]) -> None:
    """Load gone: back to 2 replicas, and Serve stops replicas so that one GPU node is free again."""
    final = findings["final"]["running_per_node"]
    assert len(final) == 1 and set(final) <= GPU_NODES and list(final.values()) == [2], findings["final"]
    assert sorted(findings["final"]["gpu_free_per_node"].values()) == [0.0, 1.0]
    assert findings["timings_s"]["to_downscale_decision"] is not None
    assert findings["timings_s"]["to_scaled_down"] > 0


def test_no_request_failed(findings: dict[str, Any]) -> None:
    load = findings["load"]
    assert load["requests_failed"] == 0, load["failures"]
    assert load["requests_ok"] == load["requests_sent"] > 0
    # Each request reached the upstream exactly once: no replica lost one while scaling.
    assert findings["upstream_requests"] == load["requests_ok"]
