"""Exporter health: sources, errors, sample duration, scrape duration."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from kwatt_dashboards.common import (
    CLUSTER,
    JOB,
    NODE,
    UID_EXPORTER,
    UID_NODE,
    cluster_variable,
    drill,
    grid,
    new_dashboard,
    query_variable,
    row,
    sel,
    single,
    target,
    ts,
)

H = sel(JOB, NODE)
UP = sel(JOB)
# Prometheus' own per-target series carry no node label: borrow it from kwatt_build_info.
BY_INSTANCE = ("on (cluster, job, instance) group_left (node) "
               f"max by (cluster, job, instance, node) (kwatt_build_info{H})")


def build() -> dashboard.Dashboard:
    variables = [
        cluster_variable(),
        query_variable("job", "Job", "kwatt_build_info", [CLUSTER],
                       "Prometheus job that scrapes kwatt."),
        query_variable("node", "Node", "kwatt_build_info", [CLUSTER, JOB],
                       "Nodes running the kwatt exporter."),
    ]
    to_node = drill(UID_NODE, "Node ${__field.labels.node}", node="node")
    return (
        new_dashboard(UID_EXPORTER, "Is kwatt itself healthy: targets, sources, errors, "
                      "how long a sample and a scrape take.", variables)
        .with_row(row("Targets and sources"))
        .with_panel(single(
            "Targets up", "Scrape targets of the job that answered the last scrape, and all "
            "targets.", "short",
            target(f"sum(up{UP})", "up", instant=True),
            target(f"count(up{UP})", "targets", instant=True)))
        .with_panel(single(
            "Version", "kwatt exporter versions running (count of nodes per version).",
            "short",
            target(f"count by (version) (kwatt_build_info{H})", "{{version}}", instant=True)))
        .with_panel(ts(
            "Source up", "1 when the source read without fault in the last sample.", "short",
            target(f"kwatt_source_up{H}", "{{node}} {{source}}"), links=[to_node]))
        .with_panel(ts(
            "Source errors", "Failed reads per second by source and reason.", "short",
            target(f"sum by (node, source, reason) (rate(kwatt_source_errors_total{H}"
                   f"[$__rate_interval]))", "{{node}} {{source}} {{reason}}"),
            links=[to_node]))
        .with_row(row("Sampling"))
        .with_panel(ts(
            "Sample duration", "p50 and p99 of one sampler cycle (kwatt_sample_duration_"
            "seconds); compare with the sampling interval.", "s",
            target(f"histogram_quantile(0.5, sum by (node, le) (rate("
                   f"kwatt_sample_duration_seconds_bucket{H}[$__rate_interval])))",
                   "{{node}} p50"),
            target(f"histogram_quantile(0.99, sum by (node, le) (rate("
                   f"kwatt_sample_duration_seconds_bucket{H}[$__rate_interval])))",
                   "{{node}} p99"),
            target(f"max by (node) (kwatt_sample_interval_seconds{H})", "{{node}} interval")))
        .with_panel(ts(
            "Cycles per interval", "Sampler cycles completed per configured interval: 1 "
            "means sampling keeps up; under 0.8 fires KwattSamplingBehind.", "percentunit",
            target(f"sum by (node) (rate(kwatt_sample_duration_seconds_count{H}"
                   f"[$__rate_interval]))\n* on (node) max by (node) "
                   f"(kwatt_sample_interval_seconds{H})", "{{node}}")))
        .with_panel(ts(
            "Scrape duration", "How long Prometheus takes to scrape each exporter.", "s",
            target(f"scrape_duration_seconds{UP}\n* {BY_INSTANCE}", "{{node}}")))
        .with_panel(ts(
            "Samples per scrape", "Series each exporter exposes (grows with containers and "
            "GPUs; finished containers stay for the retention window).", "short",
            target(f"scrape_samples_scraped{UP}\n* {BY_INSTANCE}", "{{node}}")))
        .with_panel(ts(
            "Retained finished containers", "Finished containers whose series are still "
            "exposed so their last value is scraped.", "short",
            target(f"kwatt_retained_containers{H}", "{{node}}")))
        .with_panel(ts(
            "Exporter CPU", "CPU seconds per second used by the exporter process (1 = one "
            "core).", "percentunit",
            target(f"rate(process_cpu_seconds_total{UP}[$__rate_interval])\n* {BY_INSTANCE}",
                   "{{node}} cpu")))
        .with_panel(ts(
            "Exporter memory", "Resident memory of the exporter process.", "bytes",
            target(f"process_resident_memory_bytes{UP}\n* {BY_INSTANCE}", "{{node}}")))
        .with_panel(grid(
            "Build info", "Version and Python of each exporter.", "none",
            target(f"kwatt_build_info{H}", instant=True, table_format=True)))
    )
