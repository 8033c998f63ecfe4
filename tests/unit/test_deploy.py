"""The deployment's observability files agree with the code: every Runner metric the Grafana
dashboard plots is one the services export, and Prometheus scrapes every service."""

from __future__ import annotations

import json
import re
from pathlib import Path

from services import metrics
from services.topology import SERVICES

DEPLOY = Path(__file__).parents[2] / "deploy"
GAUGES_READ_AT_SCRAPE = {"runner_workers", "runner_log_position", "runner_event_streams",
                         "runner_event_stream_position"}


def exported() -> set[str]:
    names = set(GAUGES_READ_AT_SCRAPE)
    for family in metrics.REGISTRY.collect():
        names |= {sample.name for sample in family.samples} | {family.name}
        if family.type in ("counter", "histogram"):
            names |= {f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count",
                      f"{family.name}_sum"}
    return names


def test_the_dashboard_plots_only_metrics_the_services_export() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/runner-orchestrator.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in expressions for name in re.findall(r"\brunner_[a-z_]+", e)}
    assert used and used <= exported(), used - exported()


def test_prometheus_scrapes_every_service() -> None:
    config = (DEPLOY / "prometheus.yml").read_text()
    for service in SERVICES:
        assert re.search(rf'"{service}(-\d)?:(8080|9100)"', config), service
