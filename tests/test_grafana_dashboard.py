"""deploy/grafana/csps.json: every metric its queries name is one ``csps serve`` exports (a renamed metric
would leave a panel silently empty), and the panels operators asked for are there."""

from __future__ import annotations

import json
import re
from pathlib import Path

from csps.server.metrics import ServerMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "csps.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def exported_names() -> set[str]:
    names = set()
    for family in ServerMetrics("m").registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES)
    return names


def queries() -> dict[str, list[str]]:
    doc = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in doc["panels"] if p["type"] != "row"}


def test_every_queried_metric_is_exported():
    exported = exported_names()
    used = {name for exprs in queries().values() for e in exprs for name in re.findall(r"\bcsps_[a-z0-9_]+", e)}
    assert len(used) >= 15
    assert sorted(used - exported) == []


def test_sp_bytes_by_kind_and_kv_use_per_rank_are_shown():
    q = queries()
    sp = [e for title, exprs in q.items() if "SP bytes per step" in title for e in exprs]
    assert sp and all("csps_engine_step_bytes" in e and "kind" in e for e in sp)
    assert any("csps_engine_steps_total" in e for e in sp)  # per step, not per second
    kv = q["KV-cache use per rank"]
    assert kv == ['max by (rank) (csps_kv_cache_usage_ratio{model_name=~"$model"})']


def test_panels_do_not_overlap():
    doc = json.loads(DASHBOARD.read_text())
    cells = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
