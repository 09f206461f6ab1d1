"""`kwatt-exporter --once`: two samples one interval apart, printed as a table."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from kwatt.sampler import CycleReport, Sampler
from kwatt.workloads.naming import WorkloadNamer

TOP = 15


def format_report(report: CycleReport, namer: WorkloadNamer, node: str) -> str:
    lines = [f"kwatt on {node}: average power over {report.dt or 0:.2f} s"]
    if report.utilisation is not None:
        lines[0] += f", CPU utilisation {report.utilisation:.0%}"
    lines.append("")
    lines.append(f"{'COMPONENT':<10} {'SOURCE':<10} {'WATTS':>10}")
    total = 0.0
    for (component, source), watts in sorted(report.node_watts.items()):
        lines.append(f"{component:<10} {source:<10} {watts:>10.2f}")
        total += watts
    lines.append(f"{'total':<21} {total:>10.2f}")
    if any(source == "estimated" for _, source in report.node_watts):
        lines.append("(estimated: no readable RAPL counters; see docs/metrics.md)")
    lines.append("")
    ranked = sorted(report.workload_watts.items(), key=lambda kv: kv[1], reverse=True)
    lines.append(f"{'WORKLOAD':<60} {'KIND':<12} {'WATTS':>10}")
    for key, watts in ranked[:TOP]:
        labels = namer.name(key)  # type: ignore[arg-type]
        if labels is None:
            name, kind = str(key), "unknown"
        else:
            name = "/".join(p for p in (labels.namespace, labels.pod, labels.container) if p)
            kind = labels.workload_kind or "container"
        lines.append(f"{name[:60]:<60} {kind[:12]:<12} {watts:>10.2f}")
    if not ranked:
        lines.append("(no workload used CPU in the interval)")
    elif len(ranked) > TOP:
        lines.append(f"... and {len(ranked) - TOP} more")
    return "\n".join(lines) + "\n"


def run_once(sampler: Sampler, namer: WorkloadNamer, interval: float, node: str,
             out: TextIO, sleep: Callable[[float], None]) -> int:
    sampler.sample()
    sleep(interval)
    report = sampler.sample()
    out.write(format_report(report, namer, node))
    return 0
