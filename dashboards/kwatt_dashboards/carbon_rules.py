"""Recording rules for carbon, cost, embodied carbon and energy per unit of AI work.

Emissions and cost are recorded as *rates* (grams or money per second) at each
evaluation: the energy rate times the intensity, price and PUE of that moment, joined per
node. Totals over a range are the integral of that rate (:func:`integral`), so a day
with a changing grid intensity is weighed hour by hour, not by the value at its end.

Intensity and price are aggregated with ``max by (cluster, node[, currency])`` before any
join: the exporter's static gauges carry only ``node`` (and ``currency``), live sources add
``zone`` and ``source``, and a node briefly exposing two sources must not break the
one-to-one join.
"""

from __future__ import annotations

from typing import Any

# Subquery resolution of every integral: the recorded rates are read once per step and
# summed times the step. One minute keeps a 30-day range at 43 200 points per series and
# is finer than the 5-minute rate window the rates are averaged over.
INTEGRAL_STEP = "1m"
INTEGRAL_STEP_SECONDS = 60
KWH = "3600000"
# The rolling day of the daily integrals, less one second: Prometheus 2 range selectors
# include both ends, so on a step boundary ``[1d:1m]`` would read 1441 steps, the first
# being the rate of the minute before the day began.
ROLLING_DAY = "86399s"

BY_NODE = "cluster, node"
NS_LABELS = "cluster, namespace"
WL_LABELS = "cluster, namespace, workload_kind, workload"
POD_LABELS = "cluster, namespace, pod"

INTENSITY = "node:kwatt_carbon_grams_per_kwh:pue"
PRICE = "node:kwatt_energy_price_per_kwh:pue"
EMBODIED = "kwatt_embodied_grams_per_second"

# Token and request counters of the inference servers, as each server names them
# (docs/carbon-and-cost.md lists the versions checked). ``server`` labels the result.
TOKEN_COUNTERS: tuple[tuple[str, str], ...] = (
    ("vllm", "vllm:generation_tokens_total"),
    ("tgi", "tgi_request_generated_tokens_sum"),
    ("sglang", "sglang:generation_tokens_total"),
)
REQUEST_COUNTERS: tuple[tuple[str, str], ...] = (
    ("triton", "nv_inference_request_success"),
    ("vllm", "vllm:request_success_total"),
    ("tgi", "tgi_request_success"),
)


def integral(rate_expr: str, window: str) -> str:
    """The integral of a recorded per-second rate over ``window``: each step's value
    times the step. Steps where the series is absent add nothing."""
    return (f"sum_over_time({rate_expr}[{window}:{INTEGRAL_STEP}]) "
            f"* {INTEGRAL_STEP_SECONDS}")


def _record(name: str, expr: str) -> dict[str, Any]:
    return {"record": name, "expr": expr}


def _per_node_times(energy_rate_by_node: str, factor: str, extra: str = "") -> str:
    group_left = f"group_left ({extra})" if extra else "group_left ()"
    return (f"{energy_rate_by_node} / {KWH}\n"
            f"  * on ({BY_NODE}) {group_left} {factor}")


def _embodied_share(energy_rate_by_node: str, node_energy_rate: str) -> str:
    # A workload's share of the node's embodied rate is its share of the node's energy in
    # the same window (docs/carbon-and-cost.md, "Embodied carbon", says why).
    return (f"{energy_rate_by_node}\n"
            f"  / on ({BY_NODE}) group_left () ({node_energy_rate} > 0)\n"
            f"  * on ({BY_NODE}) group_left () max by ({BY_NODE}) ({EMBODIED})")


def carbon_cost_rate_group(w: str) -> dict[str, Any]:
    """Group ``kwatt.carbon-cost-rate``: per-node factors and grams/cost per second."""
    node_e = f"sum by ({BY_NODE}) (rate(kwatt_node_energy_joules_total[{w}]))"
    ns_e = (f"sum by ({BY_NODE}, namespace) "
            f"(rate(kwatt_namespace_energy_joules_total[{w}]))")
    wl_e = (f"sum by ({BY_NODE}, namespace, workload_kind, workload) "
            f"(rate(kwatt_workload_energy_joules_total[{w}]))")
    pod_e = (f"sum by ({BY_NODE}, namespace, workload_kind, workload, pod) "
             f"(rate(kwatt_container_energy_joules_total[{w}]))")
    rules = [
        _record(INTENSITY,
                f"max by ({BY_NODE}) (kwatt_carbon_intensity_grams_per_kwh)\n"
                f"* on ({BY_NODE}) max by ({BY_NODE}) (kwatt_pue_ratio)"),
        _record(PRICE,
                f"max by ({BY_NODE}, currency) (kwatt_energy_price_per_kwh)\n"
                f"* on ({BY_NODE}) group_left () max by ({BY_NODE}) (kwatt_pue_ratio)"),
        _record(f"node:kwatt_carbon_grams_per_second:rate{w}",
                _per_node_times(node_e, INTENSITY)),
        _record(f"node_namespace:kwatt_carbon_grams_per_second:rate{w}",
                _per_node_times(ns_e, INTENSITY)),
        _record(f"namespace:kwatt_carbon_grams_per_second:rate{w}",
                f"sum by ({NS_LABELS}) "
                f"(node_namespace:kwatt_carbon_grams_per_second:rate{w})"),
        _record(f"workload:kwatt_carbon_grams_per_second:rate{w}",
                f"sum by ({WL_LABELS}) (\n  {_per_node_times(wl_e, INTENSITY)}\n)"),
        _record(f"node:kwatt_cost_per_second:rate{w}",
                _per_node_times(node_e, PRICE, "currency")),
        _record(f"namespace:kwatt_cost_per_second:rate{w}",
                f"sum by ({NS_LABELS}, currency) (\n"
                f"  {_per_node_times(ns_e, PRICE, 'currency')}\n)"),
        _record(f"workload:kwatt_cost_per_second:rate{w}",
                f"sum by ({WL_LABELS}, currency) (\n"
                f"  {_per_node_times(wl_e, PRICE, 'currency')}\n)"),
        # Per pod, with its workload: the workload dashboard's selection.
        _record(f"pod:kwatt_carbon_grams_per_second:rate{w}",
                f"sum by ({WL_LABELS}, pod) (\n  {_per_node_times(pod_e, INTENSITY)}\n)"),
        _record(f"pod:kwatt_cost_per_second:rate{w}",
                f"sum by ({WL_LABELS}, pod, currency) (\n"
                f"  {_per_node_times(pod_e, PRICE, 'currency')}\n)"),
        _record(f"pod:kwatt_embodied_grams_per_second:rate{w}",
                f"sum by ({WL_LABELS}, pod) (\n  {_embodied_share(pod_e, node_e)}\n)"),
        _record(f"namespace:kwatt_embodied_grams_per_second:rate{w}",
                f"sum by ({NS_LABELS}) (\n  {_embodied_share(ns_e, node_e)}\n)"),
        _record(f"workload:kwatt_embodied_grams_per_second:rate{w}",
                f"sum by ({WL_LABELS}) (\n  {_embodied_share(wl_e, node_e)}\n)"),
    ]
    return {"name": "kwatt.carbon-cost-rate", "rules": rules}


def daily_carbon_cost_rules(w: str) -> list[dict[str, Any]]:
    """Rolling-day totals as integrals of the recorded rates (the daily group)."""
    return [
        _record("namespace:kwatt_carbon_grams:increase1d",
                integral(f"namespace:kwatt_carbon_grams_per_second:rate{w}", ROLLING_DAY)),
        _record("namespace:kwatt_cost:increase1d",
                integral(f"namespace:kwatt_cost_per_second:rate{w}", ROLLING_DAY)),
        _record("namespace:kwatt_embodied_grams:increase1d",
                integral(f"namespace:kwatt_embodied_grams_per_second:rate{w}", ROLLING_DAY)),
        _record(f"namespace:kwatt_carbon_grams_per_hour:rate{w}",
                f"sum by ({NS_LABELS}) (\n"
                f"  node_namespace:kwatt_carbon_grams_per_second:rate{w} * 3600\n)"),
    ]


def _by_server(counters: tuple[tuple[str, str], ...], w: str) -> str:
    parts = [f'label_replace(sum by ({POD_LABELS}) (rate({{__name__="{metric}"}}[{w}])), '
             f'"server", "{server}", "", "")' for server, metric in counters]
    return "\nor\n".join(parts)


def _to_workload(pod_expr: str, w: str) -> str:
    """Sum a per-pod vector by workload, naming each pod's workload from kwatt's recorded
    pod power (the servers' metrics know pods, not owners). The recorded series, not the
    container family: at 1,000 nodes scanning that family took 34 s per evaluation."""
    return (f"sum by ({WL_LABELS}) (\n  {pod_expr}\n"
            f"  * on ({POD_LABELS}) group_left (workload_kind, workload)\n"
            f"  group by ({POD_LABELS}, workload_kind, workload) "
            f"(pod:kwatt_power_watts:sum_rate{w})\n)")


def ai_efficiency_group(w: str, sci_functional_unit: str) -> dict[str, Any]:
    """Group ``kwatt.ai-efficiency``: tokens and requests per pod of vLLM, TGI, SGLang and
    Triton, the power of the pods serving them, J/token, g/1000 tokens, requests/kWh and
    the SCI score per workload."""
    tokens = f"pod:kwatt_generated_tokens:rate{w}"
    requests = f"pod:kwatt_inference_requests:rate{w}"
    serving = f"pod:kwatt_serving_power_watts:rate{w}"
    # Pod power from the kwatt.power group's recorded rate (same 5m window), never a
    # rate() over the whole container family.
    pod_power = f"sum by ({POD_LABELS}) (pod:kwatt_power_watts:sum_rate{w})"
    rules = [
        _record(tokens, _by_server(TOKEN_COUNTERS, w)),
        _record(requests, _by_server(REQUEST_COUNTERS, w)),
        # Power of the pods that generate tokens: the numerator of J/token.
        _record(serving,
                f"{pod_power}\nand on ({POD_LABELS}) group by ({POD_LABELS}) ({tokens})"),
        _record(f"pod:kwatt_joules_per_token:rate{w}",
                f"{serving}\n/ on ({POD_LABELS}) group_right () ({tokens} > 0)"),
        _record(f"pod:kwatt_carbon_grams_per_kilotoken:rate{w}",
                f"1000 * pod:kwatt_carbon_grams_per_second:rate{w}\n"
                f"/ on ({POD_LABELS}) group_right () ({tokens} > 0)"),
        _record(f"pod:kwatt_inference_requests_per_kwh:rate{w}",
                f"{requests} * {KWH}\n/ on ({POD_LABELS}) group_left () ({pod_power} > 0)"),
        _record(f"namespace:kwatt_generated_tokens:rate{w}",
                f"sum by ({NS_LABELS}) ({tokens})"),
        _record(f"namespace:kwatt_serving_power_watts:rate{w}",
                f"sum by ({NS_LABELS}) ({serving})"),
        _record(f"workload:kwatt_generated_tokens:rate{w}", _to_workload(tokens, w)),
        _record(f"workload:kwatt_serving_power_watts:rate{w}", _to_workload(serving, w)),
        # SCI = (E x I + M) / R per workload; R is the user's functional-unit counter.
        _record(f"workload:kwatt_sci_functional_units:rate{w}",
                _to_workload(f"sum by ({POD_LABELS}) (rate({sci_functional_unit}[{w}]))", w)),
        _record(f"workload:kwatt_sci_grams_per_unit:rate{w}",
                f"(\n  workload:kwatt_carbon_grams_per_second:rate{w}\n"
                f"  + on ({WL_LABELS})\n"
                f"  (workload:kwatt_embodied_grams_per_second:rate{w} or on ({WL_LABELS}) "
                f"0 * workload:kwatt_carbon_grams_per_second:rate{w})\n)\n"
                f"/ on ({WL_LABELS}) (workload:kwatt_sci_functional_units:rate{w} > 0)"),
    ]
    return {"name": "kwatt.ai-efficiency", "rules": rules}
