"""Kubernetes scenarios on the simulated node: the real sampler, the real watcher thread and
the fake API server. In every cycle of every scenario the per-namespace energy plus the
energy still held for unnamed workloads equals the node energy attributed to containers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock
from fake_kube_api import FakeKubeApi, make_pod, write_kubeconfig
from kubetest import FAST, kube_config, wait_until
from kwatt.ledger import LedgerSnapshot, WorkloadLabels
from kwatt.sampler import Sampler
from kwatt.workloads.kubernetes import KubernetesParts, build_kubernetes
from simnode import SimContainer, SimPod, SimulatedNode, container_id, pod_uid

INTERVAL = 5.0


@dataclass
class Scenario:
    node: SimulatedNode
    api: FakeKubeApi
    clock: FakeClock
    parts: KubernetesParts
    sampler: Sampler

    def run_pod(self, name: str, namespace: str = "default", *, containers: tuple[str, ...],
                sidecars: tuple[str, ...] = (), owner: tuple[str, str] | None = None,
                labels: dict[str, str] | None = None, publish: bool = True,
                requests: dict[str, str] | None = None,
                ) -> tuple[SimPod, dict[str, SimContainer], dict[str, Any]]:
        uid = pod_uid(namespace + "/" + name)
        pod = self.node.add_pod(uid, "burstable", "containerd")
        cgroups = {c: self.node.add_container(pod, container_id(uid + c))
                   for c in (*sidecars, *containers)}
        obj = make_pod(name, namespace=namespace, uid=uid, owner=owner, labels=labels,
                       containers={c: "containerd://" + cgroups[c].container_id
                                   for c in containers},
                       init_containers={c: "containerd://" + cgroups[c].container_id
                                        for c in sidecars},
                       sidecars=sidecars, requests=requests)
        if publish:
            self.publish(obj)
        return pod, cgroups, obj

    def publish(self, obj: dict[str, Any]) -> None:
        self.api.add(obj)
        uid = obj["metadata"]["uid"]
        wait_until(lambda: uid in self.parts.store.current().pods, what=f"pod {uid}")

    def cycle(self, busy: dict[str, float], system: float = 1.0, idle: float = 10.0,
              joules: float = 100.0) -> LedgerSnapshot:
        for path, seconds in busy.items():
            self.node.add_cpu(path, seconds)
        self.node.add_node_cpu(busy_seconds=system, idle_seconds=idle)
        self.node.add_energy("0", joules)
        self.clock.advance(INTERVAL)
        self.sampler.sample()
        snap = self.sampler.snapshot()
        assert_conserved(self.sampler, snap)
        return snap


def assert_conserved(sampler: Sampler, snap: LedgerSnapshot) -> None:
    node = sum(j for c, _, j in snap.node_energy if c == "cpu")
    unattributed = sum(j for c, _, j in snap.unattributed if c == "cpu")
    namespaces = sum(j for _, c, j in snap.namespace_energy if c == "cpu")
    held = sampler.ledger.unnamed_energy().get("cpu", 0.0)
    assert namespaces + held == pytest.approx(node - unattributed, rel=1e-9, abs=1e-9)


def namespace_energy(snap: LedgerSnapshot) -> dict[str, float]:
    return {ns: j for ns, c, j in snap.namespace_energy if c == "cpu"}


def container_rows(snap: LedgerSnapshot) -> dict[WorkloadLabels, float]:
    return {row.labels: dict(row.energy)["cpu"] for row in snap.containers}


def source_up(snap: LedgerSnapshot) -> dict[str, bool]:
    return dict(snap.source_up)


@contextmanager
def scenario(tmp_path: Path) -> Iterator[Scenario]:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    api = FakeKubeApi()
    clock = FakeClock()
    with api.serve() as url:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
        config = kube_config(kubeconfig, "--path.sysfs", str(node.sysfs), "--path.procfs",
                             str(node.procfs), "--interval", "5s")
        parts = build_kubernetes(config, clock=clock, settings=FAST)
        parts.watcher.start()
        try:
            wait_until(lambda: parts.store.current().synced, what="first list")
            sampler = Sampler(config, parts.namer, clock=clock, include_host_units=False,
                              stages=[parts.stage])
            sampler.sample()
            yield Scenario(node, api, clock, parts, sampler)
        finally:
            parts.watcher.stop()
            api.close_watches()
            parts.watcher.join(5)


def test_pod_created_and_deleted_within_one_interval(tmp_path: Path) -> None:
    with scenario(tmp_path) as s:
        _, steady, _ = s.run_pod("steady", "infra", containers=("app",))
        s.cycle({steady["app"].path: 2.0})
        # ADDED and DELETED both arrive between two samples; the cgroup is still there at
        # the next sample (the kubelet cleans up after), then it is gone.
        pod, short, obj = s.run_pod("short", "batch", containers=("job",))
        s.api.delete(obj)
        wait_until(lambda: s.parts.store.current().pods[pod.uid].deleted_at is not None)
        snap = s.cycle({steady["app"].path: 2.0, short["job"].path: 3.0})
        s.node.remove_pod(pod)
        snap = s.cycle({steady["app"].path: 2.0})
        rows = container_rows(snap)
        short_labels = WorkloadLabels("batch", "short", "job", "short", "Pod")
        assert rows[short_labels] > 0  # retained for the retention window
        assert namespace_energy(snap)["batch"] == pytest.approx(rows[short_labels])
        assert s.sampler.ledger.unnamed_energy() == {}


def test_api_down_for_a_minute_then_back(tmp_path: Path) -> None:
    with scenario(tmp_path) as s:
        _, web, _ = s.run_pod("web-0", "shop", containers=("web",), owner=("StatefulSet", "web"))
        snap = s.cycle({web["web"].path: 2.0})
        assert source_up(snap)["kubernetes"]
        s.api.set_failure(500)
        wait_until(lambda: not s.parts.watcher.health.up, what="watcher sees the outage")
        # During the outage a new pod starts; it is known only by its UID.
        _, late, late_obj = s.run_pod("late", "shop", containers=("app",), publish=False)
        s.api.add(late_obj)  # stored by the API server, but the watcher cannot reach it
        held_before = 0.0
        for _ in range(12):  # one minute of 5 s cycles
            snap = s.cycle({web["web"].path: 1.0, late["app"].path: 1.0})
            assert not source_up(snap)["kubernetes"]
            # The last mapping stays in use: web is still named.
            assert WorkloadLabels("shop", "web-0", "web", "web", "StatefulSet") in \
                container_rows(snap)
            held = s.sampler.ledger.unnamed_energy()["cpu"]
            assert held > held_before
            held_before = held
        errors = {(src, reason): n for src, reason, n in snap.source_errors}
        assert errors[("kubernetes", "api")] >= 1
        shop_during = namespace_energy(snap)["shop"]

        s.api.set_failure(None)
        wait_until(lambda: s.parts.namer.name(_identity(late["app"])) is not None,
                   what="late pod named after the outage")
        snap = s.cycle({web["web"].path: 1.0, late["app"].path: 1.0})
        assert source_up(snap)["kubernetes"]
        assert s.sampler.ledger.unnamed_energy() == {}
        rows = container_rows(snap)
        late_energy = rows[WorkloadLabels("shop", "late", "app", "late", "Pod")]
        assert late_energy > held_before  # what was held by UID, plus this cycle
        # Everything held by UID during the outage moved into the namespace counter.
        assert namespace_energy(snap)["shop"] > shop_during + held_before


def _identity(container: SimContainer) -> Any:
    from kwatt.workloads.cgroups import identify_cgroup_path
    return identify_cgroup_path(container.path)


def test_pod_known_only_by_uid_until_after_its_cgroup_is_gone(tmp_path: Path) -> None:
    with scenario(tmp_path) as s:
        s.api.set_failure(500)
        wait_until(lambda: not s.parts.watcher.health.up)
        pod, quick, obj = s.run_pod("quick", "ml", containers=("train",), publish=False)
        s.api.add(obj)
        s.cycle({quick["train"].path: 4.0})
        s.cycle({quick["train"].path: 4.0})
        s.api.delete(obj)
        s.node.remove_pod(pod)
        snap = s.cycle({})
        held = s.sampler.ledger.unnamed_energy()["cpu"]
        assert held > 0 and "ml" not in namespace_energy(snap)
        # The API comes back; the watch resumes from its resourceVersion and sees the pod's
        # ADDED and DELETED events; the finished cgroup is named after the fact.
        s.api.set_failure(None)
        wait_until(lambda: pod.uid in s.parts.store.current().pods)
        snap = s.cycle({})
        assert s.sampler.ledger.unnamed_energy() == {}
        assert namespace_energy(snap)["ml"] == pytest.approx(held)
        assert container_rows(snap)[WorkloadLabels("ml", "quick", "train", "quick", "Pod")] \
            == pytest.approx(held)


def test_native_sidecar_and_pod_sandbox_are_named(tmp_path: Path) -> None:
    with scenario(tmp_path) as s:
        pod, cgroups, _ = s.run_pod(
            "api-0", "mesh", containers=("app",), sidecars=("istio-proxy",),
            requests={"app": "500m", "istio-proxy": "100m"})
        snap = s.cycle({cgroups["app"].path: 3.0, cgroups["istio-proxy"].path: 1.0,
                        pod.path: 0.5})  # pod-level: sandbox and conmon
        rows = container_rows(snap)
        assert rows[WorkloadLabels("mesh", "api-0", "app", "api-0", "Pod")] > 0
        assert rows[WorkloadLabels("mesh", "api-0", "istio-proxy", "api-0", "Pod")] > 0
        assert rows[WorkloadLabels("mesh", "api-0", "POD", "api-0", "Pod")] > 0
        assert s.parts.namer.cpu_request(_identity(cgroups["app"])) == pytest.approx(0.5)
        assert s.parts.namer.cpu_request(_identity(cgroups["istio-proxy"])) == \
            pytest.approx(0.1)


def test_replicaset_owner_chain_and_cronjob_job(tmp_path: Path) -> None:
    with scenario(tmp_path) as s:
        s.api.replicasets[("shop", "cart-5d8f7c")] = {
            "kind": "ReplicaSet", "metadata": {"name": "cart-5d8f7c", "ownerReferences": [
                {"kind": "Deployment", "name": "cart", "controller": True}]}}
        s.api.jobs[("ops", "backup-29000000")] = {
            "kind": "Job", "metadata": {"name": "backup-29000000", "ownerReferences": [
                {"kind": "CronJob", "name": "backup", "controller": True}]}}
        _, cart, _ = s.run_pod("cart-5d8f7c-abcde", "shop", containers=("cart",),
                               owner=("ReplicaSet", "cart-5d8f7c"),
                               labels={"pod-template-hash": "5d8f7c"})
        _, backup, _ = s.run_pod("backup-29000000-xyz", "ops", containers=("dump",),
                                 owner=("Job", "backup-29000000"))
        snap = s.cycle({cart["cart"].path: 2.0, backup["dump"].path: 2.0})
        rows = container_rows(snap)
        assert set(rows) == {
            WorkloadLabels("shop", "cart-5d8f7c-abcde", "cart", "cart", "Deployment"),
            WorkloadLabels("ops", "backup-29000000-xyz", "dump", "backup", "CronJob"),
        }
        assert namespace_energy(snap) == pytest.approx({"shop": rows[WorkloadLabels(
            "shop", "cart-5d8f7c-abcde", "cart", "cart", "Deployment")], "ops": rows[
            WorkloadLabels("ops", "backup-29000000-xyz", "dump", "backup", "CronJob")]})
