"""benchmarks/bench_cluster_prometheus.py at a tiny scale (3 nodes x 10 minutes): the real
exposition is replicated per node, backfilled into a real TSDB, the rules and every
dashboard query run against the real Prometheus. The figures themselves are not asserted
(wall time depends on the machine); what the benchmark builds is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import require_tool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_cluster_prometheus as bench

pytestmark = pytest.mark.slow

NODES, MINUTES, SCRAPE_S, PODS, GPUS = 3, 10, 30, 12, 2


def test_the_cluster_benchmark_measures_what_it_says(tmp_path: Path) -> None:
    require_tool("promtool")
    require_tool("prometheus")
    workdir = tmp_path / "work"
    results = bench.main(["--nodes", str(NODES), "--minutes", str(MINUTES), "--scrape",
                          str(SCRAPE_S), "--pods", str(PODS), "--gpus", str(GPUS),
                          "--repeats", "1", "--workdir", str(workdir)])
    per_node = results["series_per_node"]
    families = results["series_per_family"]
    # The template is the real exporter's exposition: 3 containers per pod, per component.
    assert families["kwatt_pod_info"] == PODS
    assert families["kwatt_gpu_info"] == GPUS
    assert families["kwatt_container_energy_joules"] >= 3 * PODS
    assert per_node == sum(families.values())
    assert results["series"] == NODES * per_node
    assert results["samples"] == NODES * per_node * (MINUTES * 60 // SCRAPE_S + 1)

    rules = {r["record"]: r for r in results["rules"]}
    assert not [r for r in rules.values() if r["error"]]
    # Pods are unique per node, namespaces span groups of nodes, nodes are all there.
    assert rules["node:kwatt_power_watts:sum_rate5m"]["series"] == NODES * 3  # cpu/dram/gpu
    assert rules["pod:kwatt_power_watts:sum_rate5m"]["series"] >= NODES * PODS
    assert rules["namespace:kwatt_power_watts:sum_rate5m"]["series"] > 0
    # Rules that read other rules were backfilled level by level, so they have inputs.
    assert rules["namespace:kwatt_carbon_grams_per_second:rate5m"]["series"] > 0
    assert rules["namespace:kwatt_cost:increase1d"]["series"] > 0
    # Only the model-server rules (vLLM/TGI series kwatt does not export) are empty.
    empty = {name for name, r in rules.items() if r["series"] == 0}
    assert all(any(word in name for word in ("token", "inference", "serving", "sci_"))
               for name in empty), empty

    panels = results["panels"]
    assert {p["dashboard"] for p in panels} >= {"kwatt-cluster", "kwatt-node",
                                                "kwatt-namespace", "kwatt-workload"}
    assert not [p for p in panels if p["error"]], [p for p in panels if p["error"]]
    cluster = [p for p in panels if p["dashboard"] == "kwatt-cluster"]
    assert cluster and all(p["cluster_wide"] for p in cluster)
    assert any(p["series"] for p in cluster)
    assert not workdir.exists()  # the TSDB is deleted unless --keep
