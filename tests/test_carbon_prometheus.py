"""Six hours of changing grid intensity and price in a real Prometheus (Debian 2.42).

The raw series (kwatt's counters and gauges, and the token and request counters of vLLM,
TGI, SGLang and Triton under their real names, labelled with namespace and pod as
Prometheus' Kubernetes discovery labels them) are written as timestamped OpenMetrics and
turned into TSDB blocks by ``promtool tsdb create-blocks-from openmetrics``. The shipped
recording rules are then backfilled level by level (``promtool tsdb create-blocks-from
rules``, restarting Prometheus so each level sees the one before), as if Prometheus had
evaluated them live every minute. Then:

- the recorded emissions, cost and embodied carbon of a namespace, integrated over the
  period, equal the hand-computed integrals within 1 %; energy x the latest intensity
  (the old method) is off by far more;
- J/token, g/1000 tokens and requests/kWh equal hand-computed values;
- ``kwatt report`` prints the numbers the dashboards' panel queries give.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool
from dashboard_model import RULES_FILE, load_dashboards, panels
from tsdb_prometheus import TsdbPrometheus

pytestmark = pytest.mark.slow

SCRAPE_S = 30
HOUR = 3600
HOURS = 6
WARMUP_S = 1800
# Namespace ml on node n1 (PUE 1.2): 600 W, then 300 W from 2h30m, inside an hour of
# constant intensity (the 5m rate's lag then moves energy within that hour only).
ML_HIGH_W, ML_LOW_W, ML_DROP_S = 600.0, 300.0, 2.5 * HOUR
N1_W, N1_PUE, N1_EMBODIED = 1000.0, 1.2, 0.01
# Hourly intensity (g/kWh) and price (EUR/kWh) of n1's zone. A new value is first
# scraped 30 s after the hour, as a source polled on its own period would deliver it.
INTENSITY = (100.0, 300.0, 500.0, 200.0, 400.0, 150.0)
PRICE = (0.1, 0.2, 0.3, 0.2, 0.1, 0.4)
# Namespace ai on node n2 (400 g/kWh, 0.25 EUR/kWh, PUE 1): the inference pods.
N2_W, N2_INTENSITY, N2_PRICE, N2_EMBODIED = 1200.0, 400.0, 0.25, 0.05
PODS = {  # pod: (workload, kind, watts, server)
    "llm-0": ("llm", "Deployment", 300.0, "vllm"),
    "tgi-0": ("tgi", "Deployment", 200.0, "tgi"),
    "sgl-0": ("sgl", "StatefulSet", 500.0, "sglang"),
    "triton-0": ("triton", "Deployment", 100.0, "triton"),
}
TOKENS_PER_S = {"llm-0": 100.0, "tgi-0": 50.0, "sgl-0": 250.0}
REQUESTS_PER_S = {"llm-0": 5.0, "triton-0": 20.0}


def ml_watts_by_hour() -> list[float]:
    """Average power of ml in each hour of the period."""
    out = []
    for hour in range(HOURS):
        high = min(max(ML_DROP_S - hour * HOUR, 0.0), HOUR)
        out.append((ML_HIGH_W * high + ML_LOW_W * (HOUR - high)) / HOUR)
    return out


# Hand-computed over the period: kWh per hour x that hour's factor x PUE.
ML_KWH = sum(ml_watts_by_hour()) / 1000
ML_GRAMS = sum(w / 1000 * i for w, i in zip(ml_watts_by_hour(), INTENSITY, strict=True)) * N1_PUE
ML_EUR = sum(w / 1000 * p for w, p in zip(ml_watts_by_hour(), PRICE, strict=True)) * N1_PUE
ML_EMBODIED = N1_EMBODIED * ML_KWH * 3.6e6 / N1_W  # its energy share of n1's rate
ML_GRAMS_OLD = ML_KWH * INTENSITY[-1] * N1_PUE  # energy x the latest intensity


def hourly(values: tuple[float, ...], t: float, t0: float) -> float:
    index = int((t - t0 - 1) // HOUR)
    return values[min(max(index, 0), HOURS - 1)]


def ml_joules(t: float, begin: float, t0: float) -> float:
    drop = t0 + ML_DROP_S
    if t <= drop:
        return ML_HIGH_W * (t - begin)
    return ML_HIGH_W * (drop - begin) + ML_LOW_W * (t - drop)


Series = tuple[str, str, Callable[[float], float]]  # family, sample name + labels, value


def series(t0: float) -> list[tuple[str, str, list[Series]]]:
    """(family, OpenMetrics type, its series) of everything Prometheus would scrape."""
    begin = t0 - WARMUP_S

    def linear(watts: float) -> Callable[[float], float]:
        return lambda t: watts * (t - begin)

    ml = lambda t: ml_joules(t, begin, t0)  # noqa: E731
    pods_e = [("kwatt_container_energy_joules_total",
               f'node="n2",namespace="ai",pod="{pod}",container="main",workload="{wl}",'
               f'workload_kind="{kind}",component="gpu"', linear(w))
              for pod, (wl, kind, w, _) in PODS.items()]
    workloads_e = [("kwatt_workload_energy_joules_total",
                    f'node="n2",namespace="ai",workload="{wl}",workload_kind="{kind}",'
                    f'component="gpu"', linear(w)) for wl, kind, w, _ in PODS.values()]
    workloads_e += [
        ("kwatt_workload_energy_joules_total", 'node="n1",namespace="ml",workload="train",'
         'workload_kind="Job",component="cpu"', lambda t: ml(t) * 2 / 3),
        ("kwatt_workload_energy_joules_total", 'node="n1",namespace="ml",workload="serve",'
         'workload_kind="Deployment",component="cpu"', lambda t: ml(t) / 3)]
    ai_w = sum(w for _, _, w, _ in PODS.values())
    return [
        ("kwatt_node_energy_joules", "counter", [
            ("kwatt_node_energy_joules_total", 'node="n1",component="cpu",source="rapl"',
             linear(N1_W)),
            ("kwatt_node_energy_joules_total", 'node="n2",component="gpu",source="nvml"',
             linear(N2_W))]),
        ("kwatt_namespace_energy_joules", "counter", [
            ("kwatt_namespace_energy_joules_total", 'node="n1",namespace="ml",component="cpu"',
             ml),
            ("kwatt_namespace_energy_joules_total", 'node="n2",namespace="ai",component="gpu"',
             linear(ai_w))]),
        ("kwatt_workload_energy_joules", "counter", workloads_e),
        ("kwatt_container_energy_joules", "counter", pods_e),
        ("kwatt_carbon_intensity_grams_per_kwh", "gauge", [
            ("kwatt_carbon_intensity_grams_per_kwh",
             'node="n1",zone="GB",source="uk-carbon-intensity"',
             lambda t: hourly(INTENSITY, t, t0)),
            ("kwatt_carbon_intensity_grams_per_kwh", 'node="n2"', lambda t: N2_INTENSITY)]),
        ("kwatt_energy_price_per_kwh", "gauge", [
            ("kwatt_energy_price_per_kwh", 'node="n1",currency="EUR",zone="GB",source="file"',
             lambda t: hourly(PRICE, t, t0)),
            ("kwatt_energy_price_per_kwh", 'node="n2",currency="EUR"', lambda t: N2_PRICE)]),
        ("kwatt_pue_ratio", "gauge", [
            ("kwatt_pue_ratio", 'node="n1"', lambda t: N1_PUE),
            ("kwatt_pue_ratio", 'node="n2"', lambda t: 1.0)]),
        ("kwatt_embodied_grams_per_second", "gauge", [
            ("kwatt_embodied_grams_per_second", 'node="n1"', lambda t: N1_EMBODIED),
            ("kwatt_embodied_grams_per_second", 'node="n2"', lambda t: N2_EMBODIED)]),
        # The inference servers, by their own metric names.
        ("vllm:generation_tokens", "counter", [
            ("vllm:generation_tokens_total", 'namespace="ai",pod="llm-0",model_name="m"',
             linear(TOKENS_PER_S["llm-0"]))]),
        ("vllm:request_success", "counter", [
            ("vllm:request_success_total",
             'namespace="ai",pod="llm-0",model_name="m",finished_reason="stop"',
             linear(REQUESTS_PER_S["llm-0"]))]),
        ("tgi_request_generated_tokens", "histogram", [
            ("tgi_request_generated_tokens_bucket", 'namespace="ai",pod="tgi-0",le="+Inf"',
             linear(1.0)),
            ("tgi_request_generated_tokens_sum", 'namespace="ai",pod="tgi-0"',
             linear(TOKENS_PER_S["tgi-0"])),
            ("tgi_request_generated_tokens_count", 'namespace="ai",pod="tgi-0"',
             linear(1.0))]),
        ("sglang:generation_tokens", "counter", [
            ("sglang:generation_tokens_total", 'namespace="ai",pod="sgl-0",model_name="m"',
             linear(TOKENS_PER_S["sgl-0"]))]),
        # Triton exposes it without a _total suffix.
        ("nv_inference_request_success", "unknown", [
            ("nv_inference_request_success",
             'namespace="ai",pod="triton-0",model="resnet",version="1"',
             linear(REQUESTS_PER_S["triton-0"]))]),
    ]


def write_openmetrics(path: Path, t0: float, end: float) -> None:
    times = [float(t) for t in range(int(t0 - WARMUP_S), int(end) + 1, SCRAPE_S)]
    with open(path, "w") as out:
        for family, kind, members in series(t0):
            out.write(f"# TYPE {family} {kind}\n")
            for name, labels, value in members:
                out.writelines(f"{name}{{{labels}}} {value(t):.6f} {t:.0f}\n" for t in times)
        out.write("# EOF\n")


# -- rules, level by level ---------------------------------------------------------------

def rule_levels() -> list[list[dict[str, Any]]]:
    """The shipped recording rules grouped so that each level reads only raw series and
    earlier levels (promtool backfills a rule from what Prometheus holds already)."""
    rules = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"]
             for r in g["rules"] if "record" in r]
    names = {r["record"] for r in rules}
    level: dict[str, int] = {}

    def depth(rule: dict[str, Any]) -> int:
        if rule["record"] not in level:
            used = [n for n in names if re.search(rf"(?<![\w:]){re.escape(n)}(?![\w:])",
                                                   rule["expr"])]
            level[rule["record"]] = 1 + max(
                (depth(next(r for r in rules if r["record"] == n)) for n in used), default=0)
        return level[rule["record"]]

    by_level: dict[int, list[dict[str, Any]]] = {}
    for rule in rules:
        by_level.setdefault(depth(rule), []).append(rule)
    return [by_level[k] for k in sorted(by_level)]


class Stack:
    def __init__(self, prometheus: TsdbPrometheus, t0: float) -> None:
        self.prometheus = prometheus
        self.t0 = t0
        self.end = t0 + HOURS * HOUR


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    promtool = require_tool("promtool")
    binary = require_tool("prometheus")
    root = tmp_path_factory.mktemp("carbon-prometheus")
    # Whole hours, half a day back: inside the default retention, clear of the head block.
    t0 = float((int(time.time()) // HOUR - HOURS - 6) * HOUR)
    data_end = t0 + HOURS * HOUR + 600
    exposition = root / "scrapes.om.txt"
    write_openmetrics(exposition, t0, data_end)
    tsdb = root / "tsdb"
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(exposition),
                    str(tsdb)], check=True, capture_output=True, timeout=300)
    for index, rules in enumerate(rule_levels()):
        rule_file = root / f"level-{index}.yaml"
        rule_file.write_text(yaml.safe_dump(
            {"groups": [{"name": f"level-{index}", "rules": rules}]}))
        prometheus = TsdbPrometheus(binary, tsdb, root, None)
        try:
            done = subprocess.run(
                [promtool, "tsdb", "create-blocks-from", "rules", "--quiet",
                 f"--url={prometheus.url}", f"--start={int(t0 - WARMUP_S + 600)}",
                 f"--end={int(data_end)}", "--eval-interval=60s",
                 f"--output-dir={tsdb}", str(rule_file)],
                capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout + done.stderr
        finally:
            prometheus.stop()
    # Now with the rules loaded, as in production; they evaluate "now", far after the data.
    prometheus = TsdbPrometheus(binary, tsdb, root, RULES_FILE)
    try:
        yield Stack(prometheus, t0)
    finally:
        prometheus.stop()


def integral(rule: str, seconds: float) -> str:
    return f"sum_over_time({rule}[{int(seconds * 1000) - 1}ms:1m]) * 60"


def test_recorded_emissions_equal_the_hand_integral_where_the_old_method_is_off(
        stack: Stack) -> None:
    p, period = stack.prometheus, HOURS * HOUR
    grams = p.value(integral('namespace:kwatt_carbon_grams_per_second:rate5m'
                             '{namespace="ml"}', period), stack.end)
    old = p.value('sum(increase(kwatt_namespace_energy_joules_total{namespace="ml"}[6h])) '
                  '/ 3600000 * on () group_left () max(kwatt_carbon_intensity_grams_per_kwh'
                  '{node="n1"}) * on () group_left () max(kwatt_pue_ratio{node="n1"})',
                  stack.end)
    eur = p.value(integral('namespace:kwatt_cost_per_second:rate5m{namespace="ml"}',
                           period), stack.end)
    embodied = p.value(integral('namespace:kwatt_embodied_grams_per_second:rate5m'
                                '{namespace="ml"}', period), stack.end)
    print(f"ml over 6 h: {grams:.2f} g recorded, {ML_GRAMS:.2f} g by hand, "
          f"{old:.2f} g by energy x latest intensity; {eur:.4f} EUR (hand {ML_EUR:.4f}); "
          f"embodied {embodied:.2f} g (hand {ML_EMBODIED:.2f})")
    assert grams == pytest.approx(ML_GRAMS, rel=0.01)
    assert eur == pytest.approx(ML_EUR, rel=0.01)
    assert embodied == pytest.approx(ML_EMBODIED, rel=0.01)
    assert old == pytest.approx(ML_GRAMS_OLD, rel=0.01)
    assert abs(old - ML_GRAMS) / ML_GRAMS > 0.3


def test_energy_per_unit_of_ai_work_equals_hand_values(stack: Stack) -> None:
    p, at = stack.prometheus, stack.end
    per_token = {(r["metric"]["pod"], r["metric"]["server"]): float(r["value"][1])
                 for r in p.query("pod:kwatt_joules_per_token:rate5m", at)}
    assert per_token == {
        (pod, PODS[pod][3]): pytest.approx(PODS[pod][2] / rate, rel=1e-6)
        for pod, rate in TOKENS_PER_S.items()}  # 3, 4 and 2 J/token
    per_kwh = {r["metric"]["pod"]: float(r["value"][1])
               for r in p.query("pod:kwatt_inference_requests_per_kwh:rate5m", at)}
    assert per_kwh == {pod: pytest.approx(rate * 3.6e6 / PODS[pod][2], rel=1e-6)
                       for pod, rate in REQUESTS_PER_S.items()}  # Triton: 720 000
    # 0.3 kW x 400 g/kWh / 3600 s / 100 tokens/s x 1000
    assert p.value('pod:kwatt_carbon_grams_per_kilotoken:rate5m{pod="llm-0"}', at) == \
        pytest.approx(0.3 * 400 / 3600 / 100 * 1000, rel=1e-6)
    # SCI of llm per vLLM request: (E x I + M) / R
    sci = (0.3 * 400 / 3600 + N2_EMBODIED * 300 / N2_W) / REQUESTS_PER_S["llm-0"]
    assert p.value('workload:kwatt_sci_grams_per_unit:rate5m{workload="llm"}', at) == \
        pytest.approx(sci, rel=1e-6)


# -- kwatt report against the dashboards ----------------------------------------------------

def report(stack: Stack, *args: str, end: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "kwatt", "report", "--prometheus.url", stack.prometheus.url,
         "--end", f"{end:.3f}", "--period", "6h", "--format", "json", *args],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def panel_values(stack: Stack, uid: str, title: str, variables: dict[str, str],
                 at: float) -> dict[str, dict[str, float]]:
    """Each target's instant result of a dashboard panel, by legend-relevant labels."""
    model = load_dashboards()[uid]
    (panel,) = [p for p in panels(model) if p["title"] == title]
    builtins = {"__range": f"{HOURS * HOUR}s", "__interval_ms": "60000", "__interval": "1m",
                "cluster": ".*", **variables}
    out: dict[str, dict[str, float]] = {}
    for target in panel["targets"]:
        expr = re.sub(r"\$\{?(\w+)\}?", lambda m: builtins[m.group(1)], target["expr"])
        out[target["legendFormat"]] = {
            json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
            for r in stack.prometheus.query(expr, at)}
    return out


def only(values: dict[str, float]) -> float:
    (value,) = values.values()
    return value


def test_report_prints_what_the_dashboards_show(stack: Stack) -> None:
    # Dashboards run at "now", rarely on a whole minute: so does this comparison.
    at = stack.end + 17.5
    by_ns = {row["namespace"]: row for row in report(stack, end=at)["rows"]}
    ns = panel_values(stack, "kwatt-namespace", "Carbon over range", {"namespace": "ml"}, at)
    assert by_ns["ml"]["operational_gco2e"] == pytest.approx(only(ns["operational"]), rel=1e-9)
    assert by_ns["ml"]["embodied_gco2e"] == pytest.approx(only(ns["embodied"]), rel=1e-9)
    cost = panel_values(stack, "kwatt-namespace", "Cost over range", {"namespace": "ml"}, at)
    assert by_ns["ml"]["cost_EUR"] == pytest.approx(only(cost["{{currency}}"]), rel=1e-9)
    energy = panel_values(stack, "kwatt-namespace", "Energy over range",
                          {"namespace": "ml"}, at)
    assert by_ns["ml"]["kwh"] == pytest.approx(only(energy["energy"]), rel=1e-9)
    # ...and those are the hand-computed figures (the period ends 17.5 s after the hour:
    # 300 W for 17.5 s more, and as much less at the start at 600 W, is within 1 %).
    assert by_ns["ml"]["operational_gco2e"] == pytest.approx(ML_GRAMS, rel=0.01)
    assert by_ns["ml"]["cost_EUR"] == pytest.approx(ML_EUR, rel=0.01)
    assert by_ns["ml"]["kwh"] == pytest.approx(ML_KWH, rel=0.01)
    # ai: the token servers draw 1000 W for 400 tokens/s.
    assert by_ns["ai"]["joules_per_token"] == pytest.approx(2.5, rel=1e-6)

    by_wl = {row["workload"]: row for row in report(stack, "--by", "workload", end=at)["rows"]}
    panel = panel_values(stack, "kwatt-ai", "Joules per token over range",
                         {"namespace": "ai"}, at)
    shown = {json.loads(k)["workload"]: v for k, v in panel["{{namespace}}/{{workload}}"].items()}
    assert shown == {wl: pytest.approx(by_wl[wl]["joules_per_token"], rel=1e-9)
                     for wl in ("llm", "tgi", "sgl")}
    assert (shown["llm"], shown["tgi"], shown["sgl"]) == (
        pytest.approx(3.0, rel=1e-6), pytest.approx(4.0, rel=1e-6), pytest.approx(2.0, rel=1e-6))
    assert by_wl["triton"]["joules_per_token"] is None
    top = panel_values(stack, "kwatt-cluster", "Top namespaces by carbon", {}, at)
    operational = {json.loads(k)["namespace"]: v for k, v in
                   top["{{namespace}} operational"].items()}
    assert operational["ml"] == pytest.approx(by_ns["ml"]["operational_gco2e"], rel=1e-9)
    assert operational["ai"] == pytest.approx(by_ns["ai"]["operational_gco2e"], rel=1e-9)


def test_report_says_when_rules_are_not_loaded(tmp_path: Path) -> None:
    prometheus = TsdbPrometheus(require_tool("prometheus"), tmp_path / "tsdb", tmp_path, None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "kwatt", "report", "--prometheus.url", prometheus.url],
            capture_output=True, text=True, timeout=60)
    finally:
        prometheus.stop()
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "recording rules are not loaded" in done.stderr
