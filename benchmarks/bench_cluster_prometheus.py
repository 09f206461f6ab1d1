"""Cluster scale: what kwatt's series cost a real Prometheus at N nodes.

1. One node's real exposition: the real ``kwatt.exporter.Exporter`` in Kubernetes mode (the
   fake API server from tests/) on a simulated 110-pod node (330 containers, RAPL, no GPUs),
   sampled on a fake clock and rendered as OpenMetrics. Its series per family are counted.
2. That exposition is the template of every node: the same families, labels and cardinality,
   with ``node`` (and the ``job``/``instance`` labels Prometheus adds when it scrapes) set
   per node and counters advancing at the template's own rate times a per-node factor
   (0.5..1.5) with +-10 % noise per scrape. The series are written as timestamped OpenMetrics
   and turned into TSDB blocks by ``promtool tsdb create-blocks-from openmetrics``.
3. The real Prometheus (Debian's 2.42) is started on those blocks. Each recording rule's
   expression of dashboards/rules/kwatt-rules.yaml is timed as an instant query at the end of
   the window (what one evaluation costs). The recording rules are then backfilled with
   ``promtool tsdb create-blocks-from rules`` and every dashboard query is timed as a range
   query over the window, with variables resolved as Grafana would (cluster = All, the
   others their first value), against raw and recorded series.

    .venv/bin/python benchmarks/bench_cluster_prometheus.py --nodes 1000 --minutes 30

Prints the figures and writes them as JSON (--json). The TSDB is deleted at the end unless
--keep is given. Needs promtool and prometheus on PATH (or /usr/bin).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402

RULES_FILE = REPO / "dashboards" / "rules" / "kwatt-rules.yaml"
GRAFANA_DIR = REPO / "dashboards" / "grafana"
TEMPLATE_NODE = "bench"
CONTAINERS = ("app", "sidecar", "log")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_METRIC = re.compile(r"\b([a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+|kwatt_[a-zA-Z0-9_]+|up)\b")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$", re.S)
_REGEX_SPECIALS = re.compile(r"([\\^$.|?*+()\[\]{}])")


# -- 1. one node's real exposition -------------------------------------------------------------

def node_exposition(pods: int, gpus: int, cycles: int = 6,
                    interval: float = 5.0) -> tuple[str, float]:
    """OpenMetrics text of the real exporter on a simulated ``pods``-pod node with ``gpus``
    fake NVML GPUs (tests/nvml_fake.py; no PodResources, so their energy is unallocated),
    and the fake seconds its counters ran for."""
    from fake_kube_api import FakeKubeApi, make_pod, write_kubeconfig
    from kwatt.config import load_config
    from kwatt.exporter import Exporter
    from nvml_fake import FakeGpu, FakeNvml
    from prometheus_client.openmetrics.exposition import generate_latest
    from simnode import SimulatedNode, container_id, pod_uid

    rng = random.Random(3)
    api = FakeKubeApi()
    now = [1000.0]
    with tempfile.TemporaryDirectory() as tmp, api.serve() as url:
        node = SimulatedNode(Path(tmp) / "node", cgroup_version=2, driver="systemd",
                             vcpus=32, noise_files=True)
        node.add_intel_server_zones(sockets=2)
        paths = []
        for i in range(pods):
            name = f"app{i % 37}-5d8f7c-{i:04x}"
            uid = pod_uid(name)
            pod = node.add_pod(uid, ("guaranteed", "burstable", "besteffort")[i % 3],
                               "containerd")
            ids = {}
            for c in CONTAINERS:
                sim = node.add_container(pod, container_id(f"{name}-{c}"))
                ids[c] = "containerd://" + sim.container_id
                paths.append(sim.path)
            api.add(make_pod(name, namespace=f"team-{i % 20}", uid=uid, node=TEMPLATE_NODE,
                             owner=("ReplicaSet", f"app{i % 37}-5d8f7c"),
                             containers=ids, requests={"app": "500m"}))
        kubeconfig = write_kubeconfig(Path(tmp) / "kubeconfig", url)
        # Carbon, price and embodied carbon configured: their families are part of the
        # exposition a cluster that uses the carbon dashboards scrapes.
        (Path(tmp) / "kwatt.yaml").write_text(
            "carbon:\n  intensity_grams_per_kwh: 300\ncost:\n  price_per_kwh: 0.2\n"
            "embodied:\n  kg_co2e: 1500\n")
        config = load_config(["--config", str(Path(tmp) / "kwatt.yaml"),
                              "--path.sysfs", str(node.sysfs), "--path.procfs",
                              str(node.procfs), "--kubernetes", "on", "--kubeconfig",
                              str(kubeconfig), "--gpu", "on", "--node-name", TEMPLATE_NODE],
                             env={})
        gpu_list = [FakeGpu(f"GPU-{i:02d}", utilisation_percent=50, power_mw=200_000)
                    for i in range(gpus)]
        exporter = Exporter(config, clock=lambda: now[0],
                            gpu_backend_factory=lambda: FakeNvml(gpu_list))
        exporter.start_watch()
        try:
            deadline = time.monotonic() + 60
            assert exporter.kube is not None
            while not exporter.kube.store.current().synced:
                if time.monotonic() > deadline:
                    raise SystemExit("the pod watch did not sync")
                time.sleep(0.05)
            start = now[0]
            gpu_clock = time.monotonic()
            for _ in range(cycles):
                # GPUs are read on their own thread in wall time: advance their counters in
                # wall time too (a counter faster than its power is refused as implausible).
                time.sleep(0.3)
                elapsed, gpu_clock = time.monotonic() - gpu_clock, time.monotonic()
                for gpu in gpu_list:
                    gpu.energy_mj += int(gpu.power_mw * elapsed)
                for path in paths:  # every container uses some CPU: every series non-zero
                    node.add_cpu(path, rng.uniform(0.01, 0.2))
                node.add_node_cpu(busy_seconds=40, idle_seconds=120)
                node.add_energy("0", rng.uniform(900, 1100))
                node.add_energy("0:2", rng.uniform(90, 110))
                now[0] += interval
                exporter.sampler.sample()
            text = generate_latest(exporter.registry).decode()
        finally:
            exporter.stop_watch()
    return text, now[0] - start


@dataclass(frozen=True)
class Family:
    meta: list[str]  # its # TYPE / # UNIT / # HELP lines
    kind: str
    samples: list[tuple[str, str, float]]  # (name, labels without braces, value)


def parse(text: str) -> list[Family]:
    families: list[Family] = []
    for line in text.splitlines():
        if line.startswith("# EOF") or not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if not families or families[-1].samples or parts[2] != _family_name(families[-1]):
                families.append(Family([], "unknown", []))
            families[-1].meta.append(line)
            if parts[1] == "TYPE":
                families[-1] = Family(families[-1].meta, parts[3], families[-1].samples)
            continue
        match = _SAMPLE.match(line)
        assert match, line
        families[-1].samples.append((match.group(1), (match.group(2) or "{}")[1:-1],
                                     float(match.group(3))))
    return families


def _family_name(family: Family) -> str:
    return family.meta[0].split(" ", 3)[2] if family.meta else ""


def is_counter_sample(family: Family, name: str) -> bool:
    return family.kind == "counter" and name.endswith("_total")


# -- 2. synthetic cluster as OpenMetrics -------------------------------------------------------

def write_cluster(families: list[Family], out: Path, nodes: int, start: int, end: int,
                  scrape_s: int, elapsed_s: float) -> int:
    """Timestamped OpenMetrics of ``nodes`` nodes; returns the samples written."""
    rng = random.Random(5)
    stamps = list(range(start, end + 1, scrape_s))
    factors = [rng.uniform(0.5, 1.5) for _ in range(nodes)]
    written = 0
    node_label = f'node="{TEMPLATE_NODE}"'
    per_pod = re.compile(r'\b(pod|uid)="([^"]*)"')
    per_group = re.compile(r'\bnamespace="([^"]*)"')
    with open(out, "w", buffering=1 << 22) as handle:
        for family in families:
            handle.write("\n".join(family.meta) + "\n")
            # _created samples carry the series' start time, not a value that changes.
            samples = [s for s in family.samples if not s[0].endswith("_created")]
            for n in range(nodes):
                name_n = f"n{n:05d}"
                extra = f'instance="{name_n}:9102",job="kwatt"'
                factor = factors[n]
                for name, labels, value in samples:
                    # Pod names and uids are unique in a cluster; a namespace (and so its
                    # workloads) spans a group of 50 nodes: 400 namespaces at 1,000 nodes.
                    labels_n = labels.replace(node_label, f'node="{name_n}"')
                    labels_n = per_pod.sub(lambda m, n=n: f'{m[1]}="{m[2]}-{n:05d}"', labels_n)
                    labels_n = per_group.sub(lambda m, n=n: f'namespace="{m[1]}-g{n // 50:03d}"',
                                             labels_n)
                    prefix = f"{name}{{{labels_n + ',' if labels_n else ''}{extra}}} "
                    if is_counter_sample(family, name):
                        per_scrape = value / elapsed_s * scrape_s * factor
                        current = value * factor * 1000  # some history before the window
                        lines = []
                        for t in stamps:
                            current += per_scrape * rng.uniform(0.9, 1.1)
                            lines.append(f"{prefix}{current:.6f} {t}\n")
                        handle.write("".join(lines))
                    else:
                        text = f"{value!r}"
                        handle.write("".join(f"{prefix}{text} {t}\n" for t in stamps))
                    written += len(stamps)
        handle.write("# EOF\n")
    return written


# -- 3. the real Prometheus --------------------------------------------------------------------

def tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                   else None)
    if not found:
        raise SystemExit(f"{name} not found")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB, from outside the process."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0]) / 1024
    return found


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Prometheus:
    def __init__(self, tsdb: Path, workdir: Path, rules: bool) -> None:
        config = workdir / "prometheus.yml"
        config.write_text("global: {evaluation_interval: 1h}\n"
                          + (f"rule_files: [{RULES_FILE}]\n" if rules else ""))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
             "--storage.tsdb.retention.time=30d", "--query.timeout=5m",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((workdir / "prometheus.log").read_text()[-2000:])
            time.sleep(0.2)

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=600) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(body.get("error", body))
        return body["data"]

    def timed(self, path: str, repeats: int, **params: Any) -> tuple[float, int, str]:
        """Median wall seconds of ``repeats`` queries, result series, error ("" if none)."""
        took = []
        series = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                data = self.get(path, **params)
            except RuntimeError as exc:
                return time.perf_counter() - t0, 0, str(exc)[:200]
            took.append(time.perf_counter() - t0)
            series = len(data["result"])
        return statistics.median(took), series, ""

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def recording_rules() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES_FILE.read_text())
    return [(r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]
            if "record" in r]


def rule_levels() -> list[list[tuple[str, str]]]:
    """The recording rules by depth: level 1 reads only raw series, level n reads rules of
    levels below n."""
    rules = recording_rules()
    names = {record for record, _ in rules}
    depth: dict[str, int] = {}
    while len(depth) < len(rules):
        for record, expr in rules:
            needs = reads(expr)[1] & names
            if record not in depth and needs <= depth.keys():
                depth[record] = 1 + max((depth[n] for n in needs), default=0)
    levels: list[list[tuple[str, str]]] = [[] for _ in range(max(depth.values()))]
    for record, expr in rules:
        levels[depth[record] - 1].append((record, expr))
    return levels


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    expr: str
    instant: bool
    cluster_wide: bool  # selects no single node, namespace, workload or pod


def dashboard_queries(prom: Prometheus, window: tuple[int, int], scrape_s: int,
                      range_s: int) -> list[PanelQuery]:
    found = []
    builtins = {"__rate_interval": f"{4 * scrape_s}s", "__range": f"{range_s}s",
                "__interval": f"{scrape_s}s", "__interval_ms": str(1000 * scrape_s)}
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        model = json.loads(path.read_text())
        values: dict[str, str] = {}
        narrowing: set[str] = set()
        for var in model.get("templating", {}).get("list", []):
            if var["type"] == "textbox":
                values[var["name"]] = var["query"]
            elif var["type"] == "query":
                query = var["query"] if isinstance(var["query"], str) else \
                    var["query"]["query"]
                match = _LABEL_VALUES.match(query)
                labels: list[str] = []
                if match and var["name"] != "cluster":
                    selector = substitute(match.group(1), values, builtins)
                    labels = sorted(prom.get(f"/api/v1/label/{match.group(2)}/values",
                                             **{"match[]": selector, "start": window[0],
                                                "end": window[1]}))
                if labels:
                    values[var["name"]] = _REGEX_SPECIALS.sub(r"\\\\\1", labels[0])
                    narrowing.add(var["name"])
                else:
                    values[var["name"]] = var.get("allValue") or ".*"
        for panel in _panels(model):
            for target in panel.get("targets", []):
                used = {a or b for a, b in _VAR.findall(target["expr"])}
                found.append(PanelQuery(
                    model["uid"], panel["title"],
                    substitute(target["expr"], values, builtins),
                    bool(target.get("instant")), not (used & narrowing)))
    return found


def _panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in model.get("panels", []):
        if panel.get("type") == "row":
            out += [p for p in panel.get("panels", []) if p.get("type") != "row"]
        else:
            out.append(panel)
    return out


def substitute(text: str, values: dict[str, str], builtins: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return builtins.get(name) or values.get(name, ".*")
    return _VAR.sub(replace, text)


def reads(expr: str) -> tuple[set[str], set[str]]:
    """(raw kwatt series, kwatt recording rules) an expression reads; other series (a
    model server's, e.g. vllm:...) are neither."""
    names = set(_METRIC.findall(expr))
    return ({n for n in names if ":" not in n},
            {n for n in names if ":" in n and n.split(":")[1].startswith("kwatt_")})


# -- report ------------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    """The figures of a saved run (--json) as the tables of docs/scale-cluster.md."""
    out = ["| recording rule | instant query at the window's end | series |", "|---|---|---|"]
    for r in sorted(results["rules"], key=lambda r: -r["seconds"]):
        out.append(f"| `{r['record']}` | {r['seconds']:.3f} s | {r['series']} |")
    out += ["", "| dashboard / panel | reads | range over window | a third of it | series |",
            "|---|---|---|---|---|"]
    for p in sorted(results["panels"], key=lambda p: -p["seconds"]):
        raw, rec = reads(p["expr"])
        scope = "cluster-wide" if p["cluster_wide"] else "one selection"
        what = ", ".join(f"`{n}`" for n in sorted(rec)) if not raw else \
            "raw " + ", ".join(f"`{n}`" for n in sorted(raw))
        kind = "instant" if p["instant"] else f"{p['seconds']:.3f} s"
        third = "" if p["instant"] else f"{p['seconds_third_range']:.3f} s"
        took = f"{p['seconds']:.3f} s (instant)" if p["instant"] else kind
        out.append(f"| {p['dashboard']} / {p['panel']} ({scope}) | {what} | {took} | {third} "
                   f"| {p['series']}{' ERROR ' + p['error'] if p['error'] else ''} |")
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--minutes", type=int, default=30, help="window of data")
    parser.add_argument("--scrape", type=int, default=30, help="scrape interval, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--report", type=Path, default=None,
                        help="print a saved run (--json) as markdown tables and stop")
    args = parser.parse_args(argv)
    if args.report:
        saved: dict[str, Any] = json.loads(args.report.read_text())
        print(markdown(saved))
        return saved
    results: dict[str, Any] = {"nodes": args.nodes, "pods": args.pods,
                               "minutes": args.minutes, "scrape_s": args.scrape,
                               "cpus": os.cpu_count(),
                               "loadavg": os.getloadavg()[0]}

    t0 = time.perf_counter()
    text, elapsed = node_exposition(args.pods, args.gpus)
    families = parse(text)
    per_family = Counter({_family_name(f): sum(1 for s in f.samples
                                               if not s[0].endswith("_created"))
                          for f in families})
    series_per_node = sum(per_family.values())
    results["series_per_node"] = series_per_node
    results["series_per_family"] = dict(per_family.most_common())
    results["exposition_bytes"] = len(text.encode())
    print(f"one node: {args.pods} pods, {3 * args.pods} containers, {args.gpus} GPUs: "
          f"{series_per_node} series "
          f"({len(text) / 1024:.0f} KiB OpenMetrics, _created samples not counted); "
          f"{series_per_node / 15:.1f} samples/s at a 15 s scrape, "
          f"{series_per_node / 30:.1f} at 30 s")
    for name, count in per_family.most_common(12):
        print(f"  {count:6d}  {name}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kwatt-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tsdb = workdir / "tsdb"
    # Inside one 2 h block, ending a few hours back: within the default retention, and
    # nothing the head would have to hold.
    end = (int(time.time()) // 7200 - 2) * 7200 + 7200 - 60
    start = end - args.minutes * 60
    om = workdir / "cluster.om.txt"
    t1 = time.perf_counter()
    samples = write_cluster(families, om, args.nodes, start, end, args.scrape, elapsed)
    t2 = time.perf_counter()
    results.update(samples=samples, series=series_per_node * args.nodes,
                   openmetrics_bytes=om.stat().st_size, generate_s=t2 - t1)
    print(f"{args.nodes} nodes x {args.minutes} min at {args.scrape} s: "
          f"{series_per_node * args.nodes} series, {samples} samples, "
          f"{om.stat().st_size / 1e9:.2f} GB OpenMetrics written in {t2 - t1:.0f} s")
    backfill = subprocess.run(
        ["/usr/bin/time", "-f", "%M %e %U %S", tool("promtool"), "tsdb",
         "create-blocks-from", "openmetrics", str(om), str(tsdb)],
        capture_output=True, text=True)
    if backfill.returncode != 0:
        raise SystemExit(backfill.stderr[-2000:])
    max_kb, wall, user, system = backfill.stderr.strip().splitlines()[-1].split()
    om.unlink()
    results.update(backfill_s=float(wall), backfill_cpu_s=float(user) + float(system),
                   backfill_max_rss_mb=int(max_kb) / 1024, tsdb_bytes=dir_bytes(tsdb))
    print(f"promtool backfill: {float(wall):.0f} s wall, {float(user) + float(system):.0f} s "
          f"CPU, {int(max_kb) / 1024:.0f} MB peak RSS; blocks {dir_bytes(tsdb) / 1e6:.0f} MB "
          f"({dir_bytes(tsdb) / samples:.2f} bytes/sample)")

    # The recorded series, as Prometheus would have written them over the window: promtool
    # evaluates each rule against the server on its own, so the rules that read other rules
    # are backfilled level by level, the server restarted on the new blocks in between.
    t3 = time.perf_counter()
    levels = rule_levels()
    for level, rules in enumerate(levels, 1):
        rules_file = workdir / f"rules-{level}.yaml"
        rules_file.write_text(yaml.safe_dump({"groups": [{"name": f"level{level}", "rules": [
            {"record": record, "expr": expr} for record, expr in rules]}]}))
        recorded = workdir / f"recorded-{level}"
        prom = Prometheus(tsdb, workdir, rules=False)
        try:
            if level == 1:
                results["prometheus_start_rss_mb"] = proc_status(prom.proc.pid)
            backfill = subprocess.run(
                [tool("promtool"), "tsdb", "create-blocks-from", "rules",
                 f"--start={start}", f"--end={end}", f"--url={prom.url}",
                 f"--output-dir={recorded}", f"--eval-interval={max(60, args.scrape)}s",
                 str(rules_file)], capture_output=True, text=True)
        finally:
            prom.stop()
        if backfill.returncode != 0:
            print(f"rule backfill, level {level}, failed:", backfill.stderr[-1500:])
        for block in recorded.iterdir() if recorded.exists() else []:
            if block.is_dir():
                shutil.move(str(block), tsdb / block.name)
    results["rules_backfill_s"] = time.perf_counter() - t3
    print(f"recording rules backfilled over the window in {results['rules_backfill_s']:.0f} s "
          f"({len(levels)} levels)")

    prom = Prometheus(tsdb, workdir, rules=False)
    try:
        results["prometheus_loaded_rss_mb"] = proc_status(prom.proc.pid)
        cpu_before = proc_cpu_s(prom.proc.pid)
        rule_times = []
        for record, expr in recording_rules():
            # count(): the evaluation without the cost of sending every series as JSON,
            # which a rule evaluation does not have.
            took, _, error = prom.timed("/api/v1/query", args.repeats,
                                        query=f"count(({expr}))", time=end)
            counted = 0 if error else prom.get("/api/v1/query", query=f"count(({expr}))",
                                               time=end)["result"]
            rule_times.append({"record": record, "seconds": took,
                               "series": int(float(counted[0]["value"][1])) if counted else 0,
                               "error": error})
        results["rules"] = rule_times
        results["rules_total_s"] = sum(r["seconds"] for r in rule_times)
        results["rules_cpu_s"] = (proc_cpu_s(prom.proc.pid) - cpu_before) / (args.repeats + 1)
        results["prometheus_after_rules_rss_mb"] = proc_status(prom.proc.pid)
        print(f"recording rules, each expression as an instant query at the window's end "
              f"(median of {args.repeats}): {results['rules_total_s']:.2f} s in all, "
              f"{results['rules_cpu_s']:.1f} CPU-s of Prometheus per evaluation of all")
        for r in sorted(rule_times, key=lambda r: -r["seconds"])[:15]:
            print(f"  {r['seconds']:7.3f} s  {r['series']:6d} series  {r['record']}"
                  f"{'  ERROR ' + r['error'] if r['error'] else ''}")
        cpu_before = proc_cpu_s(prom.proc.pid)
        step = max(args.scrape, (end - start) // 250)
        panels = []
        for q in dashboard_queries(prom, (start, end), args.scrape, end - start):
            if q.instant:
                took, series, error = prom.timed("/api/v1/query", args.repeats,
                                                 query=q.expr, time=end)
                short = took
            else:
                took, series, error = prom.timed("/api/v1/query_range", args.repeats,
                                                 query=q.expr, start=start, end=end,
                                                 step=step)
                short, _, _ = prom.timed("/api/v1/query_range", 1, query=q.expr,
                                         start=end - (end - start) // 3, end=end, step=step)
            raw, rec = reads(q.expr)
            panels.append({"dashboard": q.dashboard, "panel": q.panel, "seconds": took,
                           "seconds_third_range": short,
                           "series": series, "error": error, "instant": q.instant,
                           "cluster_wide": q.cluster_wide, "raw": sorted(raw),
                           "recorded": sorted(rec), "expr": q.expr})
        results["panels"] = panels
        results["panels_cpu_s"] = (proc_cpu_s(prom.proc.pid) - cpu_before) / args.repeats
        results["prometheus_after_panels_rss_mb"] = proc_status(prom.proc.pid)
        results["head_series"] = prom.get("/api/v1/query",
                                          query="prometheus_tsdb_head_series")["result"]
    finally:
        prom.stop()
    results["tsdb_bytes_with_recorded"] = dir_bytes(tsdb)
    print(f"dashboard queries (range over the window, step {step} s; instant at its end), "
          f"median of {args.repeats}; Prometheus RSS after: "
          f"{results['prometheus_after_panels_rss_mb']}")
    for p in sorted(panels, key=lambda p: -p["seconds"]):
        flag = "cluster-wide" if p["cluster_wide"] else "selected"
        source = "RAW " + ",".join(p["raw"]) if p["raw"] and p["cluster_wide"] else \
            "recorded" if not p["raw"] else "raw, narrowed"
        print(f"  {p['seconds']:7.3f} s  {p['series']:5d}  {p['dashboard']}/{p['panel']} "
              f"[{flag}; {source}]{'  ERROR ' + p['error'] if p['error'] else ''}")
    results["total_s"] = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
