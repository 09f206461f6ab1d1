"""Prometheus recording and alert rules for kwatt, generated from one set of parameters.

Two files come out of the same code. dashboards/rules/kwatt-rules.yaml, rendered with the
defaults of :class:`RuleParams`, is what plain Prometheus loads (``rule_files:``); other
thresholds come from the CLI (``python dashboards/generate.py rules --help``).
dashboards/chart/kwatt-rules.chart.yaml is the same rules with every chart-tunable
parameter rendered as a placeholder token (:class:`Placeholder`); the Helm chart's
PrometheusRule template replaces each token with its value from ``prometheusRule.*`` at
install time. Numbers are formatted the way the chart's Go template formats them, so the
chart with any values renders exactly what this module renders with the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import Any

import yaml

from kwatt_dashboards.carbon_rules import (
    ai_efficiency_group,
    carbon_cost_rate_group,
    daily_carbon_cost_rules,
)

JOULES_PER_KWH = 3.6e6
RUNBOOK_BASE = "https://github.com/kwatt-project/kwatt/blob/main/docs/runbooks.md"

# Every aggregation keeps `cluster` so multi-cluster Prometheus setups (cluster added by
# relabelling) stay separated; where the label is absent `by (cluster)` simply drops it.
BY_NODE = "cluster, node"


@dataclass(frozen=True)
class RuleParams:
    """Tunable thresholds; the defaults are what the shipped file is generated with.

    Each field except those in NOT_IN_CHART is also a Helm value (see ``chart_key``): a new
    field needs its key in helm/kwatt/values.yaml and values.schema.json, which
    tests/test_chart_rules.py asks for.
    """

    job: str = "kwatt"
    rate_window: str = "5m"
    # Evaluation interval of the 24 h energy/carbon/cost group; empty = Prometheus' global
    # one. On large clusters "5m" makes the 1d increases cheap at no visible loss.
    daily_interval: str = ""
    exporter_down_for: str = "5m"
    exporter_absent_for: str = "15m"
    source_down_for: str = "10m"
    estimation_for: str = "15m"
    estimation_lookback: str = "1d"
    gpu_idle_utilization: float = 0.05
    gpu_idle_window: str = "30m"
    gpu_idle_for: str = "1h"
    budget_for: str = "15m"
    unattributed_reasons: str = "system|unallocated|unidentified"
    unattributed_ratio: float = 0.3
    unattributed_for: str = "30m"
    sample_duration_ratio: float = 0.5
    sample_rate_ratio: float = 0.8
    sampling_for: str = "15m"
    # namespace -> kWh per rolling day; users add more with their own recording rules.
    namespace_budgets_kwh: dict[str, float] = field(default_factory=dict)
    # SCI's R: the counter (a PromQL selector) whose rate is the functional unit of the
    # workload:kwatt_sci_grams_per_unit rule, e.g. requests or generated tokens.
    sci_functional_unit: str = "vllm:request_success_total"


# Fields the chart does not expose: rate_window is part of the recorded series' names that
# the dashboards query, and budgets are a map the chart expands from a prototype rule.
NOT_IN_CHART = frozenset({"rate_window", "namespace_budgets_kwh"})
# Fields set at prometheusRule.<key>; every other chart field is prometheusRule.alerts.<key>.
CHART_TOP_LEVEL = frozenset({"job", "daily_interval", "sci_functional_unit"})
TOKEN_PREFIX = "__KWATT_"


def chart_key(name: str) -> str:
    """The Helm values key of a RuleParams field: camelCase of its name."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


class Placeholder(str):
    """A parameter value standing for ``prometheusRule.<key>`` in the chart's rules file.

    Its text is the token ``__KWATT_<key>__``; numbers also have a percent form. Keys are
    camelCase (no underscore), so no token is a prefix of another, and the plain rules file
    is checked to contain no ``__KWATT_`` text that a token could be confused with.
    """

    key: str

    def __new__(cls, key: str) -> Placeholder:
        token = super().__new__(cls, f"{TOKEN_PREFIX}{key}__")
        token.key = key
        return token

    def derived(self, form: str) -> str:
        return f"{TOKEN_PREFIX}{form}_{self.key}__"


def number(value: float) -> str:
    """``value`` as Go's ``printf "%g"`` prints a float64: the shortest digits that read
    back as the same float, exponent form below 1e-4 and from 1e6 up. (Python's ``:g``
    would round to 6 digits, and the chart could not reproduce it.)"""
    if isinstance(value, Placeholder):
        return str(value)
    sign, digits, exponent = Decimal(repr(float(value))).normalize().as_tuple()
    assert isinstance(exponent, int)  # finite: thresholds are never inf or nan
    text = "".join(map(str, digits))
    point = len(text) + exponent  # digits before the decimal point
    scientific = point - 1
    if text == "0":
        body = "0"
    elif scientific < -4 or scientific >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        body = f"{mantissa}e{'-' if scientific < 0 else '+'}{abs(scientific):02d}"
    elif point <= 0:
        body = "0." + "0" * -point + text
    elif point >= len(text):
        body = text + "0" * (point - len(text))
    else:
        body = text[:point] + "." + text[point:]
    return ("-" if sign else "") + body


def _times_rounded(value: float, factor: float) -> str:
    """``value * factor`` to the nearest integer (ties to even), computed on the decimal
    texts as Helm's ``mulf`` does, then printed as Go's ``printf "%.0f"`` does."""
    with localcontext(Context(prec=60)):
        product = Decimal(repr(float(value))) * Decimal(repr(float(factor)))
        return f"{product.quantize(Decimal(1), rounding=ROUND_HALF_EVEN):f}"


def percent(value: float) -> str:
    """A ratio as a whole percentage, e.g. 0.05 -> 5%."""
    if isinstance(value, Placeholder):
        return value.derived("PERCENT")
    return _times_rounded(value, 100) + "%"


def budget_joules(kwh: float) -> str:
    if isinstance(kwh, Placeholder):
        return kwh.derived("JOULES")
    return _times_rounded(kwh, JOULES_PER_KWH)


def runbook(alert: str) -> str:
    return f"{RUNBOOK_BASE}#{alert.lower()}"


def _alert(name: str, expr: str, for_: str, severity: str, summary: str,
           description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": runbook(name),
        },
    }


def _record(name: str, expr: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"record": name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def recording_groups(p: RuleParams) -> list[dict[str, Any]]:
    w = p.rate_window
    power = [
        _record(f"node:kwatt_power_watts:sum_rate{w}",
                f"sum by ({BY_NODE}, component, source) "
                f"(rate(kwatt_node_energy_joules_total[{w}]))"),
        _record(f"namespace:kwatt_power_watts:sum_rate{w}",
                f"sum by (cluster, namespace, component) "
                f"(rate(kwatt_namespace_energy_joules_total[{w}]))"),
        # Workload views read the workload counter: it outlives pods, so short-lived pods
        # are growth of an existing series, which rate() and increase() count.
        _record(f"workload:kwatt_power_watts:sum_rate{w}",
                f"sum by (cluster, namespace, workload_kind, workload, component) "
                f"(rate(kwatt_workload_energy_joules_total[{w}]))"),
        # Keeps each pod's workload: the AI-efficiency group reads pod power and the
        # pod -> workload mapping from here instead of scanning every container series.
        _record(f"pod:kwatt_power_watts:sum_rate{w}",
                f"sum by (cluster, namespace, workload_kind, workload, pod, component) "
                f"(rate(kwatt_container_energy_joules_total[{w}]))"),
        # Watts per node and reason: summable across nodes, unlike the ratio below, so the
        # cluster dashboard's unattributed share reads recorded series only.
        _record(f"node_reason:kwatt_unattributed_power_watts:sum_rate{w}",
                f"sum by ({BY_NODE}, reason) "
                f"(rate(kwatt_unattributed_energy_joules_total[{w}]))"),
        _record(f"node_reason:kwatt_unattributed_energy:ratio_rate{w}",
                f"sum by ({BY_NODE}, reason) "
                f"(rate(kwatt_unattributed_energy_joules_total[{w}]))\n"
                f"/ on ({BY_NODE}) group_left ()\n"
                f"sum by ({BY_NODE}) (rate(kwatt_node_energy_joules_total[{w}]))"),
    ]
    # Daily energy; daily carbon and cost integrate the per-second rates of the
    # kwatt.carbon-cost-rate group (carbon_rules.py), joined per node before summing.
    daily = [
        _record("node_namespace:kwatt_energy_joules:increase1d",
                "sum by (cluster, node, namespace) "
                "(increase(kwatt_namespace_energy_joules_total[1d]))"),
        _record("namespace:kwatt_energy_joules:increase1d",
                "sum by (cluster, namespace) (node_namespace:kwatt_energy_joules:increase1d)"),
        _record("workload:kwatt_energy_joules:increase1d",
                "sum by (cluster, namespace, workload_kind, workload) "
                "(increase(kwatt_workload_energy_joules_total[1d]))"),
        *daily_carbon_cost_rules(w),
    ]
    daily_group: dict[str, Any] = {"name": "kwatt.energy-carbon-cost"}
    if p.daily_interval:
        daily_group["interval"] = p.daily_interval
    daily_group["rules"] = daily
    groups = [{"name": "kwatt.power", "rules": power}, carbon_cost_rate_group(w), daily_group,
              ai_efficiency_group(w, p.sci_functional_unit)]
    if p.namespace_budgets_kwh:
        groups.append({"name": "kwatt.budgets", "rules": [
            _record("kwatt_namespace_energy_budget_joules",
                    f"vector({budget_joules(kwh)})", {"namespace": ns})
            for ns, kwh in sorted(p.namespace_budgets_kwh.items())]})
    return groups


def alert_group(p: RuleParams) -> dict[str, Any]:
    w = p.rate_window
    job = f'job="{p.job}"'
    rules = [
        _alert("KwattExporterDown", f"up{{{job}}} == 0", p.exporter_down_for, "warning",
               "kwatt exporter {{ $labels.instance }} is down",
               "Prometheus cannot scrape kwatt at {{ $labels.instance }}: energy of that "
               "node is not being recorded."),
        _alert("KwattExporterAbsent", f"absent(up{{{job}}})", p.exporter_absent_for,
               "warning", "No kwatt exporter is scraped",
               f"Prometheus has no target with {job}: no energy is recorded anywhere."),
        _alert("KwattExporterMissingOnNode",
               "max by (cluster, node) (kube_node_info)\n"
               "unless on (cluster, node) max by (cluster, node) (kwatt_build_info)",
               p.exporter_absent_for, "warning",
               "kwatt does not run on node {{ $labels.node }}",
               "kube-state-metrics lists node {{ $labels.node }} but no kwatt exporter "
               "reports from it (DaemonSet not scheduled, tolerations, or crash loop)."),
        _alert("KwattGpuNodeWithoutGpuMetrics",
               'max by (cluster, node) (kube_node_status_capacity{resource="nvidia_com_gpu"}) '
               "> 0\nunless on (cluster, node) max by (cluster, node) (kwatt_gpu_info)",
               p.exporter_absent_for, "warning",
               "GPU node {{ $labels.node }} has no kwatt GPU metrics",
               "Node {{ $labels.node }} advertises {{ $value }} GPUs but kwatt exports no "
               "GPU from it: the exporter is missing there or cannot load NVML."),
        _alert("KwattSourceDown", "max by (cluster, node, source) (kwatt_source_up) == 0",
               p.source_down_for, "warning",
               "kwatt source {{ $labels.source }} is failing on {{ $labels.node }}",
               "The {{ $labels.source }} source has failed every read for a while; see "
               "kwatt_source_errors_total{source=\"{{ $labels.source }}\"} for the reason."),
        _alert("KwattPowerFellBackToEstimation",
               f"sum by (cluster, node, component) "
               f'(rate(kwatt_node_energy_joules_total{{source="estimated"}}[{w}])) > 0\n'
               f"and on (cluster, node, component)\n"
               f"count by (cluster, node, component) (present_over_time("
               f'kwatt_node_energy_joules_total{{source=~"rapl|nvml|hwmon"}}'
               f"[{p.estimation_lookback}]))",
               p.estimation_for, "warning",
               "{{ $labels.node }} {{ $labels.component }} power is estimated, was measured",
               "Node {{ $labels.node }} measured {{ $labels.component }} energy in the last "
               f"{p.estimation_lookback} but now uses the estimation model: energy numbers "
               "are less accurate."),
        _alert("KwattGpuAllocatedIdle",
               "max by (cluster, node, uuid, gpu, namespace, pod, container) "
               "(kwatt_gpu_allocation_info)\n"
               "* on (cluster, node, uuid) group_left ()\n"
               "(\n  max by (cluster, node, uuid) "
               f"(max_over_time(kwatt_gpu_utilization_ratio[{p.gpu_idle_window}]))\n"
               f"  < {number(p.gpu_idle_utilization)}\n)",
               p.gpu_idle_for, "info",
               "GPU {{ $labels.gpu }} on {{ $labels.node }} is allocated but idle",
               "{{ $labels.namespace }}/{{ $labels.pod }} holds GPU {{ $labels.uuid }} "
               f"whose utilisation stayed under {percent(p.gpu_idle_utilization)} for "
               f"{p.gpu_idle_window}; it burns idle power and blocks other workloads."),
        _alert("KwattNamespaceOverEnergyBudget",
               "namespace:kwatt_energy_joules:increase1d\n"
               "> on (namespace) group_left () kwatt_namespace_energy_budget_joules",
               p.budget_for, "warning",
               "Namespace {{ $labels.namespace }} is over its energy budget",
               "Namespace {{ $labels.namespace }} used {{ $value | humanize }}J in the last "
               "24h, more than its kwatt_namespace_energy_budget_joules."),
        _alert("KwattHighUnattributedShare",
               f"sum by (cluster, node) (node_reason:kwatt_unattributed_energy:ratio_rate{w}"
               f'{{reason=~"{p.unattributed_reasons}"}}) > {number(p.unattributed_ratio)}',
               p.unattributed_for, "info",
               "{{ $value | humanizePercentage }} of {{ $labels.node }} energy is unattributed",
               f"Energy charged to no workload (reasons {p.unattributed_reasons}) exceeds "
               f"{percent(p.unattributed_ratio)} on {{{{ $labels.node }}}}."),
        _alert("KwattSamplingBehind",
               f"(\n  rate(kwatt_sample_duration_seconds_sum[{w}])\n"
               f"  / rate(kwatt_sample_duration_seconds_count[{w}])\n"
               f"  > on (cluster, node, job, instance) "
               f"{number(p.sample_duration_ratio)} * kwatt_sample_interval_seconds\n)\nor (\n"
               f"  rate(kwatt_sample_duration_seconds_count[{w}])"
               " * on (cluster, node, job, instance) kwatt_sample_interval_seconds\n"
               f"  < {number(p.sample_rate_ratio)}\n"
               # rate() divides by the whole window: only judge exporters scraped for
               # longer than it, or every start would look like missed cycles.
               "  and on (cluster, node, job, instance)\n"
               f"  present_over_time(kwatt_sample_interval_seconds[{w}] offset {w})\n)",
               p.sampling_for, "warning",
               "kwatt sampling is falling behind on {{ $labels.node }}",
               "Sampler cycles on {{ $labels.node }} take too long or run less often than "
               "the configured interval: attribution becomes coarse and counters lag."),
    ]
    return {"name": "kwatt.alerts", "rules": rules}


def build_rules(p: RuleParams) -> dict[str, Any]:
    return {"groups": [*recording_groups(p), alert_group(p)]}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
_Dumper.add_representer(Placeholder, _str)

HEADER = (
    "# Generated by dashboards/generate.py rules: do not edit, regenerate.\n"
    "# Plain Prometheus: list this file under rule_files. The Helm chart renders the same\n"
    "# rules from kwatt-rules.chart.yaml, thresholds from its prometheusRule values.\n"
)


def _dump(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def render_rules(p: RuleParams) -> str:
    return HEADER + _dump(build_rules(p))


def chart_params() -> RuleParams:
    """RuleParams whose chart-tunable values are placeholders; budgets become one
    prototype rule (namespace and kWh placeholders) the chart repeats per namespace."""
    tokens: dict[str, Any] = {item.name: Placeholder(chart_key(item.name))
                              for item in fields(RuleParams) if item.name not in NOT_IN_CHART}
    budget: dict[str, Any] = {Placeholder("budgetNamespace"): Placeholder("budgetKWh")}
    return RuleParams(**tokens, namespace_budgets_kwh=budget)


CHART_HEADER = (
    "# Generated by dashboards/generate.py: do not edit, regenerate; scripts/sync-chart-files\n"
    "# copies it into the Helm chart. The rules of dashboards/rules/kwatt-rules.yaml with\n"
    "# each tunable value as a __KWATT_<key>__ token that templates/prometheusrule.yaml\n"
    "# replaces with prometheusRule.<key> or prometheusRule.alerts.<key>\n"
    "# (__KWATT_PERCENT_<key>__: that ratio as a whole percentage). The kwatt.budgets group\n"
    "# holds one prototype rule, repeated per prometheusRule.namespaceBudgetsKWh entry.\n"
)


def render_chart_rules() -> str:
    plain = render_rules(RuleParams())
    if TOKEN_PREFIX in plain:
        raise ValueError(f"the rules contain {TOKEN_PREFIX!r}: chart placeholders would clash")
    document: dict[str, Any] = {"budgetJoulesPerKWh": JOULES_PER_KWH,
                                **build_rules(chart_params())}
    return CHART_HEADER + _dump(document)
