"""The Grafana dashboard parses, and every query names a metric raygate exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from serve_app.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]


def exported_names() -> set[str]:
    """Names as Prometheus sees them through Ray (``ray_`` prefix; counters ``_total``, histograms' series)."""
    names = set()
    for name, (kind, _, _) in METRICS.items():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}[kind]
        names |= {f"ray_{name}{s}" for s in suffixes}
    return names


def test_dashboard_queries_name_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "cluster" / "grafana" / "raygate.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    used = {m for e in exprs for m in re.findall(r"\bray_raygate_\w+", e)}
    assert used and used <= exported_names(), used - exported_names()
    assert {n.rsplit("_", 1)[0] for n in used} >= {"ray_raygate_requests", "ray_raygate_cost_usd"}


def test_prometheus_config_reads_rays_service_discovery() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text(encoding="utf-8"))
    [job] = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"][0].endswith("prom_metrics_service_discovery.json")
