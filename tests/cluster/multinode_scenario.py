"""``python -m tests.cluster.multinode_scenario``: fractional-GPU packing and autoscaling across GPU nodes.

Issue 11, "multi-node simulation", on one machine. ``ray.cluster_utils.Cluster`` starts three
Ray nodes as local processes: a CPU head node (no GPU) and two worker nodes that each declare
ONE logical GPU (no real GPU is needed: Ray only counts). A ``remote``-engine model is built
the way raygate builds every model (``serve_app.graph.build_model_deployment``), then given
the Serve options an operator puts on its ``Model_<name>`` entry of serve_config.yaml's
``deployments:`` (``MODEL_OVERRIDES``): half a GPU and no CPU per replica, autoscaling from
2 to 4 replicas, ``max_ongoing_requests`` 2. Its upstream is ``tests.fake_upstream.FakeUpstream``
with a fixed latency, so each request stays in flight ``UPSTREAM_LATENCY_MS``.

As in raygate the model is not the application's ingress: a stand-in for the Gateway
(``Front``, pinned to the head node) holds the model's handle and the driver calls it
through a ``DeploymentHandle``. (An ingress deployment would also keep every stopping
replica alive for ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` = 30 s under the
throughput flag, which is not how raygate's models scale down.)

Settings, and why:

* ``RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1``. Serve's replica scheduler SPREADs replicas
  over nodes by default, which would put the two idle half-GPU replicas on two different
  GPU nodes. With the flag Serve places each new replica itself, best fit, preferring nodes
  that already run replicas, so the two idle replicas share one GPU and the second node
  is only used once the first is full (without it, measured: one idle replica per GPU node).
  On scale-down Serve stops replicas on the nodes holding the fewest first, so one GPU node
  empties again; with the flag Serve would also migrate replicas off a node after
  ``RAY_SERVE_NODE_COMPACTION_DELAY_S`` (300 s) of stability, longer than this run. Ray 2.60
  still reads the older name ``RAY_SERVE_USE_COMPACT_SCHEDULING_STRATEGY`` but warns that it
  is deprecated. The Serve controller reads the flag and inherits the environment of the Ray
  node it runs on: it is set before the nodes start.
* ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, as ``raygate up`` and the integration cluster set it;
  it works in a multi-node cluster.
* ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0``: only the Front is an ingress; without
  it ``serve.shutdown()`` waits out the Front's 30 s drain (and times out).
* ``RAY_TMPDIR``: a private, short temp dir (unless the caller gives one), so this cluster's
  sessions and its ``ray_current_cluster`` address file never touch other clusters on the machine.
* ``autoscaling_config.metrics_interval_s`` 0.5 s: deprecated in Ray 2.60 (in favour of two
  env vars) but still what sets how often replicas and handles record and push their
  request counts; the default, 10 s, would make the scale-up slow.

Findings (one JSON object on the last stdout line): where the replicas sit when idle, the
replica count per node over time (``timeline``), where the replicas added under load land,
the scale-up and scale-down times, and the number of failed requests. ``tests/cluster/
test_multinode.py`` runs this in a subprocess and asserts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from typing import Any

APP_NAME = "multinode"
MODEL_NAME = "burst"
GPU_NODES = ("gpu_a", "gpu_b")  # custom resources that name the GPU nodes
HEAD_RESOURCE = "cpu_head"
UPSTREAM_LATENCY_MS = 800.0
CONCURRENCY = 14
MIN_REPLICAS, MAX_REPLICAS = 2, 4

# What serve_config.yaml's `deployments:` entry for `Model_burst` would say.
MODEL_OVERRIDES: dict[str, Any] = {
    "num_replicas": None,  # build_model_deployment's default (1) would conflict with autoscaling
    "max_ongoing_requests": 2,
    "ray_actor_options": {"num_gpus": 0.5, "num_cpus": 0},
    "autoscaling_config": {
        "min_replicas": MIN_REPLICAS,
        "max_replicas": MAX_REPLICAS,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 1,
        "downscale_delay_s": 3,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
    },
}

# Load: stop once all MAX_REPLICAS replicas have served for HOLD_S, or at these bounds.
HOLD_S = 3.0
LOAD_MAX_S = 90.0
MAX_REQUESTS = 2000
SCALE_DOWN_DEADLINE_S = 60.0
SAMPLE_INTERVAL_S = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_environment() -> str | None:
    """Set what the nodes, the controller and the replicas must inherit; return a temp dir to delete."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ["RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY"] = "1"
    # The Front is an ingress, and under the throughput flag Serve keeps a stopping ingress replica
    # open this long (default 30 s) for external load balancers to deregister it: there are none
    # here, and serve.shutdown() would wait for it (past its own 30 s timeout).
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
    # 2 cores: do not start idle workers for the driver ahead of time.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    if os.environ.get("RAY_TMPDIR"):
        return None
    # Short: Ray's unix socket paths live under it.
    tmp = tempfile.mkdtemp(prefix="rgmn-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    return tmp


class Front:
    """Stands in for raygate's Gateway: the ingress holding the model's handle."""

    def __init__(self, model: Any) -> None:
        self.model = model

    async def complete(self, request: Any) -> Any:
        return await self.model.complete.remote(request)


class Sampler:
    """Polls the Serve controller from a thread; keeps the model's replicas per node when they change."""

    def __init__(self, node_names: dict[str, str], t0: float) -> None:
        from ray import serve

        self.client = serve.context._get_global_client()
        self.node_names = node_names
        self.t0 = t0
        self.timeline: list[dict[str, Any]] = []
        self.latest: dict[str, Any] = {}
        self.seen: dict[str, str] = {}  # every replica ever seen RUNNING -> its node
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-sampler", daemon=True)

    def snapshot(self) -> dict[str, Any]:
        """The model deployment now: target, replicas by state, RUNNING replicas per node."""
        details = self.client.get_serve_details()
        deployment = details["applications"][APP_NAME]["deployments"][f"Model_{MODEL_NAME}"]
        replicas = deployment["replicas"]
        running = [r for r in replicas if r["state"] == "RUNNING"]
        return {
            "t": round(time.monotonic() - self.t0, 2),
            "target": deployment["target_num_replicas"],
            "states": dict(Counter(r["state"] for r in replicas)),
            "running_per_node": dict(sorted(Counter(self.node_names.get(r["node_id"], r["node_id"])
                                                    for r in running).items())),
            "running": {r["replica_id"]: self.node_names.get(r["node_id"], r["node_id"]) for r in running},
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def wait_for(self, predicate: Any, deadline_s: float, what: str) -> dict[str, Any]:
        """Poll the latest sample until ``predicate`` holds; return that sample."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            with self._lock:
                latest = self.latest
            if latest and "error" not in latest and predicate(latest):
                return latest
            await asyncio.sleep(SAMPLE_INTERVAL_S / 2)
        raise TimeoutError(f"{what}: not reached within {deadline_s:.0f} s (last sample {self.latest})")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self.snapshot()
            except Exception as exc:  # noqa: BLE001 - a missed sample is retried
                sample = {"t": round(time.monotonic() - self.t0, 2), "error": repr(exc)}
            with self._lock:
                self.latest = sample
                self.seen.update(sample.get("running", {}))
                entry = {k: v for k, v in sample.items() if k != "running"}
                if not self.timeline or {**self.timeline[-1], "t": None} != {**entry, "t": None}:
                    self.timeline.append(entry)
            self._stop.wait(SAMPLE_INTERVAL_S)

    def first(self, predicate: Any) -> float | None:
        """Time (s since t0) of the first recorded change where ``predicate`` held."""
        return next((s["t"] for s in self.timeline if "error" not in s and predicate(s)), None)


async def drive_load(front: Any, sampler: Sampler, t_start: float) -> dict[str, Any]:
    """``CONCURRENCY`` callers until every replica has served ``HOLD_S`` (or the bounds); count outcomes."""
    from serve_app.errors import RaygateError
    from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse

    sent = ok = 0
    failures: list[str] = []
    full_since: float | None = None  # when all MAX_REPLICAS replicas were first seen RUNNING
    stop = asyncio.Event()

    def should_stop() -> bool:
        nonlocal full_since
        latest = sampler.latest
        if latest.get("states", {}).get("RUNNING") == MAX_REPLICAS and latest.get("target") == MAX_REPLICAS:
            full_since = full_since or time.monotonic()
        return ((full_since is not None and time.monotonic() - full_since >= HOLD_S)
                or time.monotonic() - t_start >= LOAD_MAX_S or sent >= MAX_REQUESTS)

    async def caller(worker: int) -> None:
        nonlocal sent, ok
        while not stop.is_set():
            if should_stop():
                stop.set()
                return
            sent += 1
            request = ChatCompletionRequest(model=MODEL_NAME, max_tokens=8,
                                            messages=[{"role": "user", "content": f"caller {worker} request {sent}"}])
            try:
                answer = await front.complete.remote(request)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                failures.append(repr(exc)[:300])
                continue
            if isinstance(answer, ChatCompletionResponse):
                ok += 1
            elif isinstance(answer, RaygateError):
                failures.append(f"{type(answer).__name__}: {answer}"[:300])
            else:
                failures.append(f"unexpected answer {type(answer).__name__}")

    await asyncio.gather(*(caller(i) for i in range(CONCURRENCY)))
    held = full_since is not None and time.monotonic() - full_since >= HOLD_S
    return {"requests_sent": sent, "requests_ok": ok, "requests_failed": len(failures),
            "failures": failures[:10], "load_s": round(time.monotonic() - t_start, 2),
            "stopped_because": ("all replicas served" if held else "request cap" if sent >= MAX_REQUESTS
                                else "time cap")}


def gpu_free_per_node(node_names: dict[str, str]) -> dict[str, float]:
    """Ray core's view (GCS), as a cross-check of Serve's: GPUs still free on each GPU node."""
    import ray._private.state as state

    free = state.available_resources_per_node()
    return {node_names[n]: free.get(n, {}).get("GPU", 0.0) for n in node_names if node_names[n] in GPU_NODES}


async def wait_gpu_free(node_names: dict[str, str], expected_total: float,
                        deadline_s: float = 10.0) -> dict[str, float]:
    """Resource reports reach the GCS a little after a replica starts or stops: poll."""
    deadline = time.monotonic() + deadline_s
    while True:
        free = gpu_free_per_node(node_names)
        if abs(sum(free.values()) - expected_total) < 1e-6 or time.monotonic() > deadline:
            return free
        await asyncio.sleep(0.2)


async def exercise(front: Any, node_names: dict[str, str], t0: float, findings: dict[str, Any]) -> None:
    """Idle placement, load, scale-down; then Serve's shutdown, in the loop the handle's router runs in."""
    from ray import serve

    sampler = Sampler(node_names, t0)
    sampler.start()
    try:
        await observe(front, sampler, node_names, t0, findings)
    finally:
        sampler.stop()
        findings["timeline"] = list(sampler.timeline)
        # The throughput flag runs a handle's router in the caller's event loop: shut Serve
        # down from that loop (serve.shutdown() after asyncio.run would find it closed).
        await serve.shutdown_async()


async def observe(front: Any, sampler: Sampler, node_names: dict[str, str], t0: float,
                  findings: dict[str, Any]) -> None:
    # (1) Idle: MIN_REPLICAS replicas, all RUNNING; on which nodes?
    idle = await sampler.wait_for(lambda s: s["states"] == {"RUNNING": MIN_REPLICAS}, 60, "idle replicas")
    findings["idle"] = {"running_per_node": idle["running_per_node"],
                        "gpu_free_per_node": await wait_gpu_free(node_names, 2 - 0.5 * MIN_REPLICAS)}
    idle_replicas = dict(idle["running"])

    # (2) Load: CONCURRENCY callers through the Front's handle.
    t_load = time.monotonic()
    findings["load"] = await drive_load(front, sampler, t_load)
    t_load_end = time.monotonic()

    with sampler._lock:
        seen = dict(sampler.seen)
        timeline = [s for s in sampler.timeline if "error" not in s]
    peak = max(timeline, key=lambda s: s["states"].get("RUNNING", 0))
    findings["peak"] = {"running_per_node": peak["running_per_node"], "target": peak["target"],
                        "gpu_free_per_node": gpu_free_per_node(node_names)}
    findings["idle_replicas_nodes"] = sorted(idle_replicas.values())
    findings["added_replicas_nodes"] = sorted(node for rid, node in seen.items() if rid not in idle_replicas)

    # (3) Scale down: back to MIN_REPLICAS replicas, none still stopping.
    down = await sampler.wait_for(lambda s: s["target"] == MIN_REPLICAS and s["states"] == {"RUNNING": MIN_REPLICAS},
                                  SCALE_DOWN_DEADLINE_S, "scale-down")
    t_down = time.monotonic()
    findings["final"] = {"running_per_node": down["running_per_node"],
                         "gpu_free_per_node": await wait_gpu_free(node_names, 2 - 0.5 * MIN_REPLICAS)}

    def rel(t: float) -> float:
        return round(t - t0, 2)

    up_target = sampler.first(lambda s: s["t"] >= rel(t_load) and s["target"] > MIN_REPLICAS)
    up_full = sampler.first(lambda s: s["t"] >= rel(t_load) and s["states"].get("RUNNING", 0) == MAX_REPLICAS)
    down_target = sampler.first(lambda s: s["t"] >= rel(t_load_end) and s["target"] == MIN_REPLICAS)
    findings["timings_s"] = {
        "load_start": rel(t_load), "load_end": rel(t_load_end),
        "to_first_upscale_decision": round(up_target - rel(t_load), 2) if up_target is not None else None,
        "to_all_replicas_running": round(up_full - rel(t_load), 2) if up_full is not None else None,
        "to_downscale_decision": round(down_target - rel(t_load_end), 2) if down_target is not None else None,
        "to_scaled_down": round(t_down - t_load_end, 2),
    }


def run(findings: dict[str, Any]) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.config import ModelConfig
    from serve_app.graph import DEFAULT_GATEWAY_OPTIONS, build_model_deployment, model_deployment_name
    from tests.fake_upstream import FakeUpstream

    t0 = time.monotonic()
    upstream = FakeUpstream(latency_ms=UPSTREAM_LATENCY_MS, words=8)
    with contextlib.ExitStack() as stack:
        base_url = stack.enter_context(upstream.run_in_thread())
        stack.callback(lambda: findings.__setitem__("upstream_requests", upstream.request_count))

        # No dashboard (2 cores); the head's agent on a free port, not 52365, which another
        # cluster on the machine may hold (Cluster already does this for worker nodes).
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {HEAD_RESOURCE: 1}, "include_dashboard": False,
            "dashboard_agent_listen_port": None})
        stack.callback(cluster.shutdown)
        for name in GPU_NODES:
            cluster.add_node(num_cpus=2, num_gpus=1, resources={name: 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        stack.callback(ray.shutdown)
        node_names = {n["NodeID"]: next(r for r in (HEAD_RESOURCE, *GPU_NODES) if r in n["Resources"])
                      for n in ray.nodes() if n["Alive"]}
        findings["nodes"] = {name: {"GPU": n["Resources"].get("GPU", 0), "CPU": n["Resources"].get("CPU", 0)}
                             for n in ray.nodes() if n["Alive"] for name in [node_names[n["NodeID"]]]}
        findings["cluster_start_s"] = round(time.monotonic() - t0, 2)

        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()},
                    logging_config={"enable_access_log": False})
        stack.callback(serve.shutdown)

        config = ModelConfig.model_validate({"name": MODEL_NAME, "engine": "remote",
                                             "engine_params": {"base_url": base_url, "model": "fake-burst"}})
        built = build_model_deployment(config, os.environ["RAY_TMPDIR"])
        # serve_config.yaml's `deployments:` entry, in Python: Serve has no public accessor for
        # the Deployment an Application binds.
        model_deployment = built._bound_deployment
        assert model_deployment.name == model_deployment_name(MODEL_NAME)
        model_app = model_deployment.options(**MODEL_OVERRIDES).bind(*model_deployment.init_args,
                                                                      **model_deployment.init_kwargs)
        # Pinned to the CPU head node, so the GPU nodes hold model replicas only.
        front_options = {**DEFAULT_GATEWAY_OPTIONS,
                         "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.01}}}
        front_app = serve.deployment(Front, name="Front", **front_options).bind(model_app)
        t_deploy = time.monotonic()
        front = serve.run(front_app, name=APP_NAME, route_prefix=None)
        findings["deploy_s"] = round(time.monotonic() - t_deploy, 2)

        asyncio.run(exercise(front, node_names, t0, findings))
    findings["total_s"] = round(time.monotonic() - t0, 2)


def main() -> int:
    own_tmp = set_environment()
    findings: dict[str, Any] = {"ray_tmpdir": os.environ["RAY_TMPDIR"]}
    code = 0
    try:
        run(findings)
    except BaseException as exc:  # noqa: BLE001 - reported in the JSON, then the exit code
        findings["error"] = "".join(traceback.format_exception(exc))[-4000:]
        code = 1
    finally:
        if own_tmp and code == 0:
            shutil.rmtree(own_tmp, ignore_errors=True)
    sys.stdout.write("\n" + json.dumps(findings) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
