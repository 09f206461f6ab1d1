"""Kubernetes benchmark: 110 pods churning at 1 pod per second through the pod watch.

A simulated node (110 pods, 3 containers each) and the fake API server from tests/; the real
watcher thread talks to the server through the real ``kubernetes`` client. Every simulated
second one pod is deleted and a new one created (a DELETED and an ADDED watch event, the
cgroups removed and created), so one 5 s sampler cycle sees 5 replacements, i.e. 10 pod
events. Simulated time runs as fast as the machine allows: before each cycle the benchmark
waits until the watcher has applied that cycle's events, so the cycle is timed alone.

Reports the sampler cycle time (its thread's CPU time and wall time), RSS at 5,000 and
10,000 pod events, what the index and the ledger retain, and the kwatt_pod_info scrape.

    .venv/bin/python benchmarks/bench_kubernetes.py [--events 10000]

Targets: cycle <= 20 ms median, RSS <= 100 MB, no growth over 10,000 pod events.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_kube_api import FakeKubeApi, make_pod, write_kubeconfig
from kwatt.config import load_config
from kwatt.sampler import Sampler
from kwatt.workloads.kubernetes import build_kubernetes
from measure import profile_cycles, rss_mb
from prometheus_client import CollectorRegistry, generate_latest
from simnode import SimPod, SimulatedNode, container_id, pod_uid

INTERVAL = 5.0
CONTAINERS = ("app", "sidecar", "log")



def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("watcher did not keep up")
        time.sleep(0.0005)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--pods", type=int, default=110)
    args = parser.parse_args()
    rng = random.Random(11)
    api = FakeKubeApi(max_history=2000)
    now = [0.0]
    serial = [0]

    with tempfile.TemporaryDirectory() as tmp, api.serve() as url:
        node = SimulatedNode(Path(tmp) / "node", cgroup_version=2, driver="systemd", vcpus=32,
                             noise_files=True)
        node.add_intel_server_zones(sockets=2)
        live: list[tuple[SimPod, dict]] = []

        def start_pod() -> None:
            serial[0] += 1
            name = f"job-{serial[0]}"
            uid = pod_uid(name)
            pod = node.add_pod(uid, ("guaranteed", "burstable", "besteffort")[serial[0] % 3],
                               "containerd")
            ids = {c: node.add_container(pod, container_id(f"{name}-{c}")).container_id
                   for c in CONTAINERS}
            obj = make_pod(name, namespace=f"team-{serial[0] % 7}", uid=uid,
                           node="bench", owner=("ReplicaSet", f"svc{serial[0] % 13}-5d8f7c"),
                           labels={"pod-template-hash": "5d8f7c", "team": f"t{serial[0] % 7}"},
                           containers={c: "containerd://" + i for c, i in ids.items()},
                           requests={"app": "500m"})
            api.add(obj)
            live.append((pod, obj))

        for _ in range(args.pods):
            start_pod()
        kubeconfig = write_kubeconfig(Path(tmp) / "kubeconfig", url)
        (Path(tmp) / "kwatt.yaml").write_text("kubernetes:\n  pod_label_allowlist: [team]\n")
        config = load_config(["--config", str(Path(tmp) / "kwatt.yaml"),
                              "--path.sysfs", str(node.sysfs), "--path.procfs",
                              str(node.procfs), "--kubernetes", "on", "--kubeconfig",
                              str(kubeconfig), "--gpu", "off", "--node-name", "bench"], env={})
        parts = build_kubernetes(config, clock=lambda: now[0])
        parts.watcher.start()
        wait_for(lambda: parts.store.current().synced)
        sampler = Sampler(config, parts.namer, clock=lambda: now[0], include_host_units=False,
                          stages=[parts.stage])
        registry = CollectorRegistry(auto_describe=False)
        registry.register(parts.collector)
        sampler.sample()

        cycles = args.events // 10
        cycle_cpu = [0.0] * cycles
        cycle_wall = [0.0] * cycles
        rss_at: dict[int, float] = {}
        events_applied = parts.watcher.events
        for cycle in range(cycles):
            for _ in range(5):  # 1 pod per second: one deleted, one created
                pod, obj = live.pop(rng.randrange(len(live)))
                api.delete(obj)
                node.remove_pod(pod)
                start_pod()
            events_applied += 10
            target = events_applied
            wait_for(lambda target=target: parts.watcher.events >= target)
            for pod, _ in rng.sample(live, 20):
                node.add_cpu(pod.containers[0].path, rng.randint(1, 50) / 100)
            node.add_node_cpu(busy_seconds=1, idle_seconds=10)
            node.add_energy("0", rng.uniform(100, 900))
            node.add_energy("0:2", rng.uniform(10, 90))
            now[0] += INTERVAL
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            sampler.sample()
            cycle_cpu[cycle] = time.thread_time() - cpu0
            cycle_wall[cycle] = time.perf_counter() - wall0
            if (cycle + 1) * 10 % (args.events // 4) == 0:
                gc.collect()
                rss_at[(cycle + 1) * 10] = rss_mb()

        scrape = []
        for _ in range(50):
            t0 = time.perf_counter()
            body = generate_latest(registry)
            scrape.append(time.perf_counter() - t0)
        snap = sampler.snapshot()
        index = parts.store.current()
        tombstones = sum(1 for r in index.pods.values() if r.deleted_at is not None)
        unnamed = sampler.ledger.unnamed_energy()
        def cycle() -> None:
            now[0] += INTERVAL
            sampler.sample()

        profile = profile_cycles(cycle, 100, 10)

        parts.watcher.stop()
        api.close_watches()
        parts.watcher.join(5)

    ms = 1000.0
    print(f"churn: {args.pods} pods x {len(CONTAINERS)} containers, 1 pod/s replaced, "
          f"{parts.watcher.events} pod events through the watch ({parts.watcher.lists} list, "
          f"{parts.watcher.watches} watch requests), {cycles} cycles of {INTERVAL:g} s")
    print(f"sampler cycle CPU time   median {statistics.median(cycle_cpu) * ms:6.2f} ms  "
          f"p95 {sorted(cycle_cpu)[int(cycles * .95)] * ms:6.2f} ms  (target <= 20)")
    print(f"sampler cycle wall time  median {statistics.median(cycle_wall) * ms:6.2f} ms")
    points = sorted(rss_at)
    half, full = points[len(points) // 2 - 1], points[-1]
    print(f"RSS after {full} events   {rss_at[full]:6.1f} MB  (target <= 100); "
          f"growth {half}->{full}: {rss_at[full] - rss_at[half]:+.1f} MB; "
          + ", ".join(f"{p}: {rss_at[p]:.1f}" for p in points))
    print(f"retained: index {len(index.pods)} pods ({tombstones} tombstones), "
          f"{snap.containers_retained} finished containers in the ledger, "
          f"{len(snap.containers)} container rows; unnamed energy {unnamed or 0}")
    print(f"kwatt_pod_info scrape    median {statistics.median(scrape) * ms:6.2f} ms "
          f"({body.count(b'kwatt_pod_info{')} series)")
    print("what dominates a cycle (top functions by own time, 100 cycles):")
    print(profile)


if __name__ == "__main__":
    main()
