"""What the owner walk costs: API requests, bytes and time per pod, cold and warm cache.

A node of 110 pods: 40 of one TrainJob (TrainJob -> JobSet -> 4 Jobs -> Pods), 30 of
three RayJobs (RayJob -> RayCluster -> Pods), 20 of a LeaderWorkerSet (leaders through a
StatefulSet, workers through their leader's StatefulSet), 20 of Deployments (ReplicaSets
not served: name rule). The real resolver reads owners from the fake API server over
HTTP through the real kubernetes client; the figures include that local round trip.

    .venv/bin/python benchmarks/bench_owners.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_kube_api import FakeKubeApi, make_pod, owner_uid, write_kubeconfig
from kubetest import kube_config
from kwatt.workloads.kubernetes import api_client_for
from kwatt.workloads.podindex import pod_record
from kwatt.workloads.podwatch import DEFAULT_WATCH_SETTINGS, ApiOwnerResolver

NS = "ml"


def build(api: FakeKubeApi) -> None:
    api.add_owner("TrainJob", "llama", NS)
    api.add_owner("JobSet", "llama", NS, owner=("TrainJob", "llama",
                                                owner_uid("TrainJob", "llama", NS)))
    for job in range(4):
        name = f"llama-node-{job}"
        api.add_owner("Job", name, NS, owner=("JobSet", "llama",
                                              owner_uid("JobSet", "llama", NS)))
        for index in range(10):
            api.add(make_pod(f"{name}-{index}", namespace=NS, node="bench",
                             owner=("Job", name, owner_uid("Job", name, NS))))
    for ray in range(3):
        api.add_owner("RayJob", f"tune{ray}", NS)
        api.add_owner("RayCluster", f"tune{ray}-abcde", NS, owner=(
            "RayJob", f"tune{ray}", owner_uid("RayJob", f"tune{ray}", NS)))
        for index in range(10):
            api.add(make_pod(f"tune{ray}-w{index}", namespace=NS, node="bench", owner=(
                "RayCluster", f"tune{ray}-abcde", owner_uid("RayCluster", f"tune{ray}-abcde",
                                                            NS))))
    api.add_owner("LeaderWorkerSet", "vllm", NS)
    api.add_owner("StatefulSet", "vllm", NS, owner=(
        "LeaderWorkerSet", "vllm", owner_uid("LeaderWorkerSet", "vllm", NS)))
    lws = {"leaderworkerset.sigs.k8s.io/name": "vllm"}
    for group in range(5):
        leader = f"vllm-{group}"
        api.add(make_pod(leader, namespace=NS, node="bench", labels=lws, uid=f"leader{group}",
                         owner=("StatefulSet", "vllm", owner_uid("StatefulSet", "vllm", NS))))
        api.add_owner("StatefulSet", leader, NS, owner=("Pod", leader, f"leader{group}"))
        for worker in range(1, 4):
            api.add(make_pod(f"{leader}-{worker}", namespace=NS, node="bench", labels=lws,
                             owner=("StatefulSet", leader,
                                    owner_uid("StatefulSet", leader, NS))))
    for index in range(20):
        api.add(make_pod(f"web{index % 4}-5d8f7c-{index}", namespace="web", node="bench",
                         owner=("ReplicaSet", f"web{index % 4}-5d8f7c"),
                         labels={"pod-template-hash": "5d8f7c"}))


def main() -> None:
    api = FakeKubeApi()
    build(api)
    pods = list(api.pods.values())
    with tempfile.TemporaryDirectory() as tmp, api.serve() as url:
        config = kube_config(write_kubeconfig(Path(tmp) / "kubeconfig", url))
        resolver = ApiOwnerResolver(api_client_for(config), DEFAULT_WATCH_SETTINGS,
                                    time.monotonic, lambda fault: None)
        rounds: list[list[float]] = []
        requests: list[int] = []
        for _ in range(5):
            before = len(api.owner_requests())
            times = []
            for pod in pods:
                started = time.perf_counter()
                record = pod_record(pod, resolver, ())
                times.append(time.perf_counter() - started)
                assert record is not None
            rounds.append(times)
            requests.append(len(api.owner_requests()) - before)
        kinds = sorted({(r.workload_kind) for r in (pod_record(p, resolver, ())
                                                     for p in pods) if r})
    cold, warm = rounds[0], [t for times in rounds[1:] for t in times]
    print(f"pods: {len(pods)}; top kinds: {', '.join(kinds)}")
    print(f"cold cache: {requests[0]} owner GETs (metadata-only) for {len(pods)} pods; "
          f"resolve median {statistics.median(cold) * 1e3:.3f} ms, "
          f"total {sum(cold) * 1e3:.1f} ms")
    print(f"warm cache: {sum(requests[1:])} GETs in {len(requests) - 1} more passes; "
          f"resolve median {statistics.median(warm) * 1e6:.1f} us, "
          f"p95 {statistics.quantiles(warm, n=20)[18] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
