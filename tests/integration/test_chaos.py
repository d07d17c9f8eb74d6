"""Chaos under load: a killed model replica, a killed Gateway replica, Redis (Valkey) stopped and restarted.

Its own app (``chaos`` at ``/chaos``: 2 Gateway and 2 ``Model_echo`` replicas) on the suite's cluster and
fake upstream, with its own data dir and its own Valkey (stopped and restarted here), deployed from a config
the way ``serve deploy`` does (``deployments:`` entries set the replica counts; ``build_graph`` sets only the
Gateway's). The controller's ``apply_config`` replaces the other apps deployed from a config: in this suite
only ``rollout`` is, and it deletes its app when its module ends.

A background thread sends requests from ``CLIENTS`` concurrent clients (bounded in count and time) while the
test kills one replica actor of each deployment, then stops Valkey. What counts as a clean failure:

* killed ``Model_echo`` replica: the Gateway's calls in flight on it fail with Ray's actor errors, which it
  retries on the other replica (so usually nothing fails); what cannot be retried in time is a 503 in
  OpenAI's error shape;
* killed ``Gateway`` replica: the requests in flight on it are lost before raygate can shape an answer, so
  Serve's HTTP proxy answers them: its plain-text ``500 Internal Server Error`` (what Ray 2.60 sends), or a
  dropped connection; raygate's own OpenAI-shaped errors are accepted too;
* Valkey down: every request is a 503 in OpenAI's shape (raygate fails closed: no key can be checked), and
  the same replicas answer again once it is back, without a redeploy.

A kill may fail at most the requests in flight at that moment (at most ``CLIENTS``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.stores import start_valkey
from bench.harness import deploy_config_app, replica_actors
from tests.integration.conftest import NO_RATE_LIMITS, Deployed, create_key, free_port

pytestmark = pytest.mark.integration

APP, PREFIX = "chaos", "/chaos"
REPLICAS = 2
CLIENTS = 8
MAX_REQUESTS, MAX_LOAD_S = 40_000, 150.0  # bounds on the background load, whatever the test does
ERROR_FIELDS = {"message", "type", "param", "code"}
PROXY_500 = "Internal Server Error"  # Serve's proxy's answer for a request whose ingress replica died


@dataclass
class Sample:
    """One request as the client saw it (monotonic times)."""

    started: float
    ended: float
    status: int  # 0: no HTTP answer
    kind: str  # "ok", "openai:<code>", "proxy500", "other" or "conn:<error>"
    text: str = ""


def classify(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.status_code == 200 and isinstance(payload, dict) and payload.get("choices"):
        return "ok"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and set(error) == ERROR_FIELDS:
        return f"openai:{error['code']}"
    if response.status_code == 500 and response.text.strip() == PROXY_500:
        return "proxy500"
    return "other"


class Load:
    """``CLIENTS`` clients posting back to back on an event loop in a background thread."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        deadline = time.monotonic() + MAX_LOAD_S
        body = {"model": "echo", "messages": [{"role": "user", "content": "is the coop warm enough"}]}
        headers = {"Authorization": f"Bearer {self.key}"}
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)

        async def client(http: httpx.AsyncClient) -> None:
            while not self.stop.is_set() and len(self.samples) < MAX_REQUESTS and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    response = await http.post(self.url, json=body, headers=headers)
                    kind = classify(response)
                    text = response.text[:200] if kind != "ok" else ""
                    self.samples.append(Sample(started, time.monotonic(), response.status_code, kind, text))
                except httpx.HTTPError as exc:
                    self.samples.append(Sample(started, time.monotonic(), 0, f"conn:{type(exc).__name__}"))
                    await asyncio.sleep(0.05)  # a refused connection fails at once: do not spin

        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            await asyncio.gather(*(client(http) for _ in range(CLIENTS)))

    def successes_after(self, t: float) -> int:
        return sum(1 for s in list(self.samples) if s.kind == "ok" and s.started >= t)

    def between(self, start: float, end: float) -> list[Sample]:
        """Requests that ended in [start, end)."""
        return [s for s in list(self.samples) if start <= s.ended < end]

    def in_flight_at(self, t: float) -> int:
        return sum(1 for s in list(self.samples) if s.started <= t < s.ended)


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if value := check():
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.1)


def running(deployment: str) -> int:
    """Replicas ``serve.status()`` reports RUNNING while the deployment is HEALTHY (else 0)."""
    from ray import serve

    app = serve.status().applications.get(APP)
    info = app.deployments.get(deployment) if app is not None else None
    if info is None or info.status != "HEALTHY":
        return 0
    return int(info.replica_states.get("RUNNING", 0))


def deploy(args: dict[str, Any]) -> None:
    """What ``serve deploy`` does with a config holding this app."""
    deploy_config_app({"name": APP, "route_prefix": PREFIX, "import_path": "serve_app.graph:build_app", "args": args,
                       "deployments": [{"name": "Gateway", "num_replicas": REPLICAS},
                                       {"name": "Model_echo", "num_replicas": REPLICAS}]})


@pytest.fixture(scope="module")
def chaos(deployed: Deployed, session_data_dir: Path) -> Iterator[dict[str, Any]]:
    from ray import serve

    data_dir, port = session_data_dir / "chaos", free_port()
    state: dict[str, Any] = {"valkey": start_valkey(data_dir, port=port), "data_dir": data_dir, "port": port}
    try:
        redis_url = str(state["valkey"].connection_url)
        model = {"name": "echo", "engine": "remote",
                 "engine_params": {"base_url": deployed.upstream.base_url, "model": "e"}}
        deploy({"models": [model], "stores": {"redis_url": redis_url, "data_dir": str(data_dir)},
                "guard": NO_RATE_LIMITS, "cache": {"enabled": False},
                "placement": {"models": "deployment"}})  # a Model_echo deployment to kill
        base_url = f"{deployed.base_url}{PREFIX}"

        def healthy() -> bool:
            try:
                ok = httpx.get(f"{base_url}/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                return False
            return ok and running("Gateway") == REPLICAS and running("Model_echo") == REPLICAS

        wait_until(healthy, 180, "the chaos app never came up")
        state["key"] = create_key(redis_url, "chaos", "monkey", "premium")
        state["load"] = Load(f"{base_url}/v1/chat/completions", state["key"])
        yield state
    finally:
        if "load" in state:
            state["load"].stop.set()
            state["load"].thread.join(40)
        serve.delete(APP)
        state["valkey"].stop()


def kill_one(deployment: str, load: Load) -> tuple[float, str]:
    """Kill one replica actor of ``deployment``; return when and which."""
    import ray

    actors = replica_actors(APP, deployment)
    assert len(actors) == REPLICAS, actors
    victim = sorted(actors)[0]
    handle = ray.get_actor(victim, namespace=actors[victim])
    wait_until(lambda: load.successes_after(time.monotonic() - 1.0) >= 5, 30, "no steady load before the kill")
    at = time.monotonic()
    ray.kill(handle, no_restart=True)
    return at, victim


def replica_states(deployment: str) -> dict[str, str]:
    """The controller's live replicas of the deployment, unique id -> state."""
    import ray
    from ray.serve.context import _get_global_client

    details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
    app = details.get("applications", {}).get(APP, {})
    return {r["replica_id"]: str(getattr(r["state"], "value", r["state"]))
            for r in app.get("deployments", {}).get(deployment, {}).get("replicas", [])}


def wait_replaced(deployment: str, victim: str) -> float:
    """Poll until Serve runs REPLICAS replicas again, the killed one gone; return when."""
    victim_id = victim.split("#")[-1]

    def back() -> bool:
        states = replica_states(deployment)
        return (victim_id not in states and list(states.values()) == ["RUNNING"] * REPLICAS
                and len(replica_actors(APP, deployment)) == REPLICAS and running(deployment) == REPLICAS)

    wait_until(back, 90, f"{deployment} never came back to {REPLICAS} replicas")
    return time.monotonic()


def test_replicas_killed_and_redis_stopped_under_load(chaos: dict[str, Any]) -> None:
    load: Load = chaos["load"]
    begun = time.monotonic()
    load.thread.start()
    wait_until(lambda: load.successes_after(begun) >= 20, 60, "no successes before any fault")
    report: dict[str, Any] = {}

    # A model replica: the Gateway retries the calls lost with it on the other replica.
    model_at, victim = kill_one("Model_echo", load)
    model_back = wait_replaced("Model_echo", victim)
    wait_until(lambda: load.successes_after(model_back) >= 10, 30, "no successes after the model replica came back")

    # A Gateway replica: what was in flight on it is lost; Serve's proxy routes the rest to the other one.
    gateway_at, victim = kill_one("Gateway", load)
    gateway_back = wait_replaced("Gateway", victim)
    wait_until(lambda: load.successes_after(gateway_back) >= 10, 30, "no successes after the Gateway came back")

    # Valkey down: clean 503s; back up on the same port and data dir: the same replicas answer again.
    down_at = time.monotonic()
    chaos["valkey"].stop()
    stopped = time.monotonic()
    wait_until(lambda: sum(1 for s in load.between(stopped, float("inf")) if s.started >= stopped) >= 20, 30,
               "no answers while Valkey was down")
    restarted = time.monotonic()
    chaos["valkey"] = start_valkey(chaos["data_dir"], port=chaos["port"])
    wait_until(lambda: load.successes_after(restarted) >= 10, 30, "no successes after Valkey came back")
    done = time.monotonic()
    load.stop.set()
    load.thread.join(40)

    samples = load.samples
    assert len(samples) >= 100 and not load.thread.is_alive()
    before = [s for s in samples if s.ended < model_at]
    assert [s for s in before if s.kind != "ok"] == [], "failures before any fault"

    for name, at, until in (("model", model_at, gateway_at), ("gateway", gateway_at, down_at)):
        failed = [s for s in load.between(at, until) if s.kind != "ok"]
        in_flight = load.in_flight_at(at)
        report[name] = {"in_flight": in_flight, "failed": len(failed), "kinds": sorted({s.kind for s in failed})}
        assert len(failed) <= in_flight <= CLIENTS, (name, report[name])
        # Only requests already under way when the replica died may fail.
        assert all(s.started <= at for s in failed), (name, [(s.started - at, s.kind) for s in failed])
        clean = ("openai:",) if name == "model" else ("openai:", "proxy500", "conn:")
        assert all(s.kind.startswith(clean) for s in failed), (name, [(s.status, s.kind, s.text) for s in failed])

    while_down = [s for s in samples if s.started >= stopped and s.ended < restarted]
    assert len(while_down) >= 20
    assert all(s.status == 503 for s in while_down), sorted({(s.status, s.kind) for s in while_down})
    # From the stop on, every failure is a clean 503, the tail after the restart included (a pooled
    # connection to the old server fails once before it reconnects); and successes come back.
    unclean = [(s.status, s.kind, s.text) for s in samples
               if s.ended >= down_at and s.kind != "ok" and not (s.status == 503 and s.kind.startswith("openai:"))]
    assert unclean == [], unclean
    after = [s for s in samples if s.started >= restarted]
    report["valkey"] = {"503_while_down": len(while_down),
                        "failed_after_restart": sum(1 for s in after if s.kind != "ok")}
    assert done - begun < 120, f"the chaos took {done - begun:.0f} s"
    print(f"chaos: {len(samples)} requests in {done - begun:.0f} s; {report}")
