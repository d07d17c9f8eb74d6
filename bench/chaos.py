"""``python -m bench.chaos``: kill replicas and stop Redis under load; what fails, and how fast it comes back.

A fresh local Ray cluster (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``), an embedded Valkey, a fake upstream
(``tests.fake_upstream``, 50 ms per answer, its own process) and raygate's graph with one ``remote`` model
``echo``: 2 ``Model_echo`` replicas and 2 ``Gateway`` replicas, deployed from a config the way
``serve deploy serve_config.yaml`` does (``deployments:`` entries set the replica counts). One enterprise
key created in Valkey, no rate limits or flood blocks, no response cache: every request reaches the model.

``--clients`` concurrent clients send chat requests back to back while a chaos thread:

1. at ``t_model`` kills one ``Model_echo`` replica actor (``ray.kill(..., no_restart=True)``);
2. at ``t_gateway`` (and not before the model deployment is back) kills one ``Gateway`` replica;
3. at ``t_valkey`` (and not before the Gateway is back) stops Valkey for ``--outage-s`` seconds, then starts
   it again on the same port and data dir; the replicas are not touched.

Recorded: every request's start, end, HTTP status and error shape; per second, the successes and the
failures by status; per event, the failed requests, the requests in flight at that moment (the bound on
what a kill may fail) and the time until Serve reports the deployment back at its replica count (the
killed replica gone, a new one ``RUNNING``: ``serve.status()`` and the controller's replica list polled
every 0.1 s), or, for Valkey, the time from its restart to the first success; at the end, the model's
circuit breaker counters (a dead replica's failed calls count against it). Expected: a kill fails at most the
requests in flight on the killed replica; while Valkey is down every request is a 503 in OpenAI's error
shape (raygate fails closed: no key can be checked).

Usage::

    python -m bench.chaos            # 75-115 s on 2 busy cores (deploy included)
    python -m bench.chaos --quick    # events at 3 / 10 / 17 s, Valkey down 3 s: ~20 s less
    python -m bench.chaos --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.chaos_report import Event, Sample, event_figures, per_second, print_report
from bench.harness import deploy_config_app, replica_actors

APP, PREFIX, MODEL = "raygate-chaos", "/", "echo"
MODEL_DEPLOYMENT, GATEWAY_DEPLOYMENT = "Model_echo", "Gateway"
REPLICAS = 2
UPSTREAM_LATENCY_MS = 50
NO_RATE_LIMITS = {"plans": {"free": {}, "premium": {}, "enterprise": {}}, "flood": {"enabled": False}}
ERROR_FIELDS = {"message", "type", "param", "code"}
RECOVERY_LIMIT_S = 60.0  # a kill not recovered by then is reported as such and the run moves on
POLL_S = 0.1


def classify(status: int, payload: Any) -> str:
    """Name what a response was: a success, an OpenAI-shaped error (with its code), or anything else."""
    if status == 200 and isinstance(payload, dict) and payload.get("choices"):
        return "ok"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and set(error) == ERROR_FIELDS:
        return f"openai:{error['code']}"
    return "other"


# --- the deployment -----------------------------------------------------------------------------------


def app_config(upstream_url: str, redis_url: str, data_dir: str) -> dict[str, Any]:
    """The application as ``serve deploy`` would take it, 2 Gateway and 2 Model_echo replicas."""
    args = {"models": [{"name": MODEL, "engine": "remote",
                        "engine_params": {"base_url": upstream_url, "model": "fake-echo"}}],
            "stores": {"redis_url": redis_url, "data_dir": data_dir},
            "guard": NO_RATE_LIMITS, "cache": {"enabled": False},
            "placement": {"models": "deployment"}}  # a Model_echo deployment to kill (the default embeds it)
    return {"name": APP, "route_prefix": PREFIX, "import_path": "serve_app.graph:build_app", "args": args,
            "deployments": [{"name": GATEWAY_DEPLOYMENT, "num_replicas": REPLICAS},
                            {"name": MODEL_DEPLOYMENT, "num_replicas": REPLICAS}]}


def running_replicas(deployment: str) -> tuple[int, str]:
    """How many replicas ``serve.status()`` reports RUNNING, and the deployment's status."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0, "MISSING"
    info = app.deployments[deployment]
    return int(info.replica_states.get("RUNNING", 0)), str(info.status.value)


def replica_states(deployment: str) -> dict[str, str]:
    """The controller's live replicas of the deployment: unique id -> state (what the dashboard shows)."""
    import ray
    from ray.serve.context import _get_global_client

    details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
    app = details.get("applications", {}).get(APP, {})
    replicas = app.get("deployments", {}).get(deployment, {}).get("replicas", [])
    return {r["replica_id"]: str(getattr(r["state"], "value", r["state"])) for r in replicas}


def wait_running(deadline_s: float) -> None:
    """Poll until the app is RUNNING with every replica up."""
    from ray import serve

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {app.message}")
        if (app is not None and app.status == "RUNNING"
                and all(running_replicas(d)[0] == REPLICAS for d in (MODEL_DEPLOYMENT, GATEWAY_DEPLOYMENT))):
            return
        time.sleep(0.5)
    raise TimeoutError("the app never came up")


# --- the chaos ----------------------------------------------------------------------------------------


class Chaos:
    """The fault schedule, run in its own thread (its calls to Ray and Valkey block)."""

    def __init__(self, args: argparse.Namespace, valkey: Any, data_dir: str, port: int) -> None:
        self.args, self.valkey, self.data_dir, self.port = args, valkey, data_dir, port
        self.events: list[Event] = []
        self.t0 = 0.0
        self.done = threading.Event()  # every fault injected and recovered from
        self.error: BaseException | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wait_for(self, t: float) -> None:
        """Sleep until ``t`` seconds into the load (the schedule, not a wait for a condition)."""
        time.sleep(max(0.0, t - self.now()))

    def run(self, t0: float) -> None:
        self.t0 = t0
        try:
            self.wait_for(self.args.t_model)
            self.kill(MODEL_DEPLOYMENT)
            self.wait_for(max(self.args.t_gateway, self.settled()))
            self.kill(GATEWAY_DEPLOYMENT)
            self.wait_for(max(self.args.t_valkey, self.settled()))
            self.outage()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.done.set()

    def settled(self) -> float:
        """When the last event recovered (plus a second of steady load to compare with)."""
        last = self.events[-1]
        return (last.recovered_at if last.recovered_at is not None else self.now()) + 1.0

    def kill(self, deployment: str) -> None:
        """Kill one replica actor of ``deployment``; poll until Serve has it back at REPLICAS replicas."""
        import ray

        actors = replica_actors(APP, deployment)
        victim = sorted(actors)[0]
        event = Event(f"kill {deployment} replica", victim=victim.split("#")[-1])
        self.events.append(event)
        handle = ray.get_actor(victim, namespace=actors[victim])
        event.at = self.now()
        ray.kill(handle, no_restart=True)
        victim_id = victim.split("#")[-1]
        deadline = event.at + RECOVERY_LIMIT_S
        while self.now() < deadline:
            running, status = running_replicas(deployment)
            states = replica_states(deployment)
            if event.detected_at is None and states.get(victim_id) != "RUNNING":
                event.detected_at = self.now()  # the controller no longer counts the victim as running
            if (victim_id not in states and list(states.values()) == ["RUNNING"] * REPLICAS
                    and running == REPLICAS and status == "HEALTHY"):
                event.recovered_at = self.now()
                return
            time.sleep(POLL_S)
        event.notes.append(f"not back at {REPLICAS} replicas within {RECOVERY_LIMIT_S:.0f} s: controller "
                           f"{replica_states(deployment)}, serve.status {running_replicas(deployment)}")

    def outage(self) -> None:
        """Stop Valkey for ``outage_s``, then start it again on the same port and data dir."""
        from serve_app.stores import start_valkey

        event = Event(f"Valkey down {self.args.outage_s:.0f} s", victim=f"valkey :{self.port}")
        self.events.append(event)
        event.at = self.now()
        self.valkey.stop()
        event.stopped_at = self.now()
        self.wait_for(event.at + self.args.outage_s)
        self.valkey = start_valkey(self.data_dir, port=self.port)
        event.restarted_at = event.recovered_at = self.now()


# --- the load -----------------------------------------------------------------------------------------


async def drive(url: str, key: str, clients: int, chaos: Chaos, tail_s: float, max_s: float) -> list[Sample]:
    """``clients`` clients posting back to back until ``tail_s`` after the chaos ends (``max_s`` at most)."""
    import aiohttp

    samples: list[Sample] = []
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "How warm should a brooder be?"}],
            "max_tokens": 16}
    stop_at = [max_s]

    async def client(session: aiohttp.ClientSession) -> None:
        while chaos.now() < stop_at[0]:
            started = chaos.now()
            try:
                async with session.post(url, json=body, headers=headers) as response:
                    raw = await response.read()
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        payload = None
                    kind = classify(response.status, payload)
                    text = raw[:200].decode("utf-8", "replace") if kind == "other" else ""
                    samples.append(Sample(started, chaos.now(), response.status, kind, text))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                samples.append(Sample(started, chaos.now(), 0, f"conn:{type(exc).__name__}"))
                await asyncio.sleep(0.05)  # a refused connection returns at once: do not spin

    async def end_after_chaos() -> None:
        while not chaos.done.is_set():
            await asyncio.sleep(0.2)
        stop_at[0] = min(max_s, chaos.now() + tail_s)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(end_after_chaos(), *(client(session) for _ in range(clients)))
    return samples


# --- main ---------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from bench.harness import free_port, start_upstream
    from serve_app.auth import KeyStore
    from serve_app.stores import redis_client, start_valkey

    with contextlib.ExitStack() as stack:
        upstream, upstream_url = start_upstream("--latency-ms", str(UPSTREAM_LATENCY_MS))
        stack.callback(upstream.wait, 10)
        stack.callback(upstream.terminate)
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="raygate-chaos-"))
        valkey_port = free_port()
        chaos = Chaos(args, start_valkey(data_dir, port=valkey_port), data_dir, valkey_port)
        stack.callback(lambda: chaos.valkey.stop())
        redis_url = str(chaos.valkey.connection_url)
        http_port = free_port()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        stack.callback(ray.shutdown)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, logging_config={"enable_access_log": False})
        started = time.monotonic()
        deploy_config_app(app_config(upstream_url, redis_url, data_dir))
        await asyncio.to_thread(wait_running, 240)
        print(f"deployed in {time.monotonic() - started:.1f} s", flush=True)
        store = KeyStore(redis_client(redis_url))
        key, _ = await store.create("bench", "chaos", "enterprise")
        await store.redis.aclose()
        url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
        t0 = time.monotonic()
        chaos.t0 = t0
        thread = threading.Thread(target=chaos.run, args=(t0,), daemon=True)
        thread.start()
        samples = await drive(url, key, args.clients, chaos, args.tail_s, args.max_s)
        thread.join(RECOVERY_LIMIT_S)
        # A dead replica's calls count against the model's circuit breaker (shared through Valkey).
        client = redis_client(str(chaos.valkey.connection_url))
        circuit = await client.hgetall(f"raygate:circuit:{MODEL}")
        await client.aclose()
        # No serve.shutdown: with the throughput flag the Gateway (ingress) replicas drain for at least 30 s
        # (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S). ray.shutdown (the ExitStack) ends this cluster,
        # which is ours alone, with everything on it.
        if chaos.error is not None:
            raise chaos.error
    end = max(s.ended for s in samples)
    figures = event_figures(chaos.events, samples, end)
    baseline = [s for s in samples if s.ended < chaos.events[0].at] if chaos.events else samples
    summary = {
        "clients": args.clients, "upstream_latency_ms": UPSTREAM_LATENCY_MS, "replicas": REPLICAS,
        "duration_s": round(end, 1), "requests": len(samples), "ok": sum(1 for s in samples if s.kind == "ok"),
        "failed": sum(1 for s in samples if s.kind != "ok"),
        "baseline_rps": round(len(baseline) / max(chaos.events[0].at, 1e-9), 1) if chaos.events else None,
        # Fields the circuit's Lua scripts set only on a transition: absent means never opened.
        "circuit": {"state": circuit.get("state", "closed"), "opened": int(circuit.get("opened", 0)),
                    "skipped": int(circuit.get("skipped", 0))},
        "events": figures,
    }
    print_report(per_second(samples, chaos.events, REPLICAS), figures, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "samples": [asdict(s) for s in samples]}),
                                   encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a shorter schedule (events at 3 / 10 / 17 s)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--t-model", type=float, default=5.0, help="kill a Model_echo replica at this second")
    parser.add_argument("--t-gateway", type=float, default=20.0, help="kill a Gateway replica (once the model is back)")
    parser.add_argument("--t-valkey", type=float, default=35.0, help="stop Valkey (once the Gateway is back)")
    parser.add_argument("--outage-s", type=float, default=5.0, help="how long Valkey stays down")
    parser.add_argument("--tail-s", type=float, default=8.0, help="load after the last fault")
    parser.add_argument("--max-s", type=float, default=100.0, help="the load stops by then whatever happens")
    parser.add_argument("--json", help="also write the summary and every sample here")
    args = parser.parse_args(argv)
    if args.quick:
        args.t_model, args.t_gateway, args.t_valkey, args.outage_s, args.tail_s = 3.0, 10.0, 17.0, 3.0, 5.0
    # Serve reads its flags when it is imported, here and in every process Ray starts from here.
    os.environ.update({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"})
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
