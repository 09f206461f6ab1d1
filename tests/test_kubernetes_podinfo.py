"""kwatt_pod_info, the pod index, Kubernetes mode selection, and the exporter end to end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FakeClock, require_tool
from fake_kube_api import FakeKubeApi, make_pod, write_kubeconfig
from kwatt.config import ConfigError, load_config
from kwatt.workloads.kubernetes import (
    PodInfoCollector,
    api_client_for,
    kubernetes_enabled,
    sanitize_label_name,
)
from kwatt.workloads.podindex import (
    OwnerResolver,
    PodStore,
    parse_cpu_quantity,
    pod_record,
)
from prometheus_client import CollectorRegistry, generate_latest
from simnode import SimulatedNode, container_id, pod_uid


@pytest.mark.parametrize(("text", "cores"), [
    ("500m", 0.5), ("2", 2.0), ("1.5", 1.5), ("250000u", 0.25), ("100000000n", 0.1),
    ("0.1", 0.1), ("1e3m", 1.0), ("1k", 1000.0),
])
def test_cpu_quantities(text: str, cores: float) -> None:
    assert parse_cpu_quantity(text) == pytest.approx(cores)


@pytest.mark.parametrize("text", ["", "m", "-1", "abc", "1Gi", "1.2.3"])
def test_bad_cpu_quantities(text: str) -> None:
    assert parse_cpu_quantity(text) is None


def _store_with(*pods: dict, allowlist: tuple[str, ...] = ()) -> PodStore:
    store = PodStore(300.0, FakeClock())
    records = [pod_record(p, OwnerResolver(), allowlist) for p in pods]
    store.replace_all([r for r in records if r is not None])
    return store


def test_pod_info_renders_allowlisted_labels_kube_state_metrics_style() -> None:
    allowlist = ("app.kubernetes.io/name", "team", "cost-center")
    store = _store_with(
        make_pod("web-1", namespace="shop", uid="u1", owner=("StatefulSet", "web"),
                 labels={"app.kubernetes.io/name": "web", "team": "checkout",
                         "secret": "x"}, qos="Guaranteed"),
        make_pod("solo", namespace="dev", uid="u2", labels={"team": "ml"}, qos="BestEffort"),
        allowlist=allowlist)
    registry = CollectorRegistry()
    registry.register(PodInfoCollector(store.current, "node-a", allowlist))
    text = generate_latest(registry).decode()
    assert ('kwatt_pod_info{label_app_kubernetes_io_name="web",label_cost_center="",'
            'label_team="checkout",namespace="shop",node="node-a",owner_kind="StatefulSet",'
            'owner_name="web",pod="web-1",'
            'qos_class="Guaranteed",uid="u1",workload="web",workload_kind="StatefulSet"} 1.0'
            ) in text
    assert ('kwatt_pod_info{label_app_kubernetes_io_name="",label_cost_center="",'
            'label_team="ml",namespace="dev",node="node-a",owner_kind="",owner_name="",'
            'pod="solo",qos_class="BestEffort",'
            'uid="u2",workload="solo",workload_kind="Pod"} 1.0') in text
    assert "secret" not in text


def test_label_names_are_sanitised_and_collisions_keep_the_first() -> None:
    assert sanitize_label_name("app.kubernetes.io/name") == "label_app_kubernetes_io_name"
    assert sanitize_label_name("team") == "label_team"
    store = _store_with(make_pod("p", uid="u", labels={"a.b": "1", "a-b": "2"}),
                        allowlist=("a.b", "a-b"))
    registry = CollectorRegistry()
    registry.register(PodInfoCollector(store.current, "n", ("a.b", "a-b")))
    assert 'label_a_b="1"' in generate_latest(registry).decode()


def test_tombstones_are_bounded_and_expire() -> None:
    clock = FakeClock()
    store = PodStore(retention_seconds=60.0, clock=clock, max_tombstones=3)
    owners = OwnerResolver()
    for index in range(5):
        record = pod_record(make_pod(f"p{index}", uid=f"u{index}", containers={
            "c": "cri-o://" + container_id(str(index))}), owners, ())
        assert record is not None
        store.upsert(record)
        store.delete(record)
        clock.advance(1)
    assert sorted(store.current().pods) == ["u2", "u3", "u4"]  # newest three kept
    assert container_id("4") in store.current().containers
    clock.advance(61)
    store.prune()
    assert dict(store.current().pods) == {}
    assert dict(store.current().containers) == {}


def test_relist_tombstones_pods_that_vanished() -> None:
    clock = FakeClock()
    store = PodStore(300.0, clock)
    owners = OwnerResolver()
    a = pod_record(make_pod("a", uid="ua"), owners, ())
    b = pod_record(make_pod("b", uid="ub"), owners, ())
    assert a is not None and b is not None
    store.replace_all([a, b])
    store.replace_all([b])
    assert store.current().pods["ua"].deleted_at == clock.now
    assert store.current().pods["ub"].deleted_at is None


def test_restarted_container_keeps_its_previous_id() -> None:
    pod = make_pod("p", uid="u", containers={"c": "containerd://" + container_id("new")})
    pod["status"]["containerStatuses"][0]["lastState"] = {
        "terminated": {"containerID": "containerd://" + container_id("old"), "exitCode": 1}}
    record = pod_record(pod, OwnerResolver(), ())
    assert record is not None
    assert dict(record.containers) == {container_id("new"): "c", container_id("old"): "c"}


def test_mode_selection(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    base = ["--node-name", "n"]
    cfg = load_config([*base, "--kubernetes", "auto"], env={
        "KWATT_KUBERNETES_SERVICE_ACCOUNT_DIR": str(sa)})
    assert not kubernetes_enabled(cfg)
    (sa / "token").write_text("t")
    assert kubernetes_enabled(cfg)
    assert not kubernetes_enabled(load_config([*base, "--kubernetes", "off"], env={}))
    assert kubernetes_enabled(load_config([*base, "--kubernetes", "on"], env={}))
    assert kubernetes_enabled(load_config(
        [*base, "--kubeconfig", str(tmp_path / "kc")], env={}), exists=lambda p: False)


def test_node_name_is_required_when_kubernetes_is_found(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("t")
    env = {"KWATT_KUBERNETES_SERVICE_ACCOUNT_DIR": str(sa)}
    with pytest.raises(ConfigError, match="--node-name: required when --kubernetes=on"):
        load_config(["--kubernetes", "on"], env={})
    with pytest.raises(ConfigError, match="--node-name: required when --kubernetes=auto"):
        load_config(["--kubernetes", "auto"], env=env)
    assert load_config(["--kubernetes", "auto"], env={**env, "NODE_NAME": "n1"}).node_name \
        == "n1"
    # Outside a cluster auto stays host mode and the hostname names the node.
    assert load_config(["--kubernetes", "auto"], env={}, hostname=lambda: "h",
                       path_exists=lambda p: False).node_name == "h"


def test_in_cluster_config_from_the_service_account_dir(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    cfg = load_config(["--node-name", "n", "--kubernetes", "on"], env={
        "KWATT_KUBERNETES_SERVICE_ACCOUNT_DIR": str(sa)})
    client = api_client_for(cfg)
    assert client.configuration.host == "https://10.0.0.1:443"
    assert client.configuration.api_key["BearerToken"].endswith("sa-token")
    assert client.configuration.refresh_api_key_hook is not None  # projected tokens rotate
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ConfigError, match=r"kubernetes\.service_account_dir"):
        api_client_for(cfg)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_exporter_names_containers_and_serves_pod_info(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    uid = pod_uid("shop/cart")
    pod = node.add_pod(uid, "burstable", "containerd")
    cart = node.add_container(pod, container_id("cart"))
    api = FakeKubeApi()
    api.add(make_pod("cart-5d8f7c-abcde", namespace="shop", uid=uid,
                     owner=("ReplicaSet", "cart-5d8f7c"), labels={
                         "pod-template-hash": "5d8f7c", "team": "checkout"},
                     containers={"cart": "containerd://" + cart.container_id}))
    config_file = tmp_path / "kwatt.yaml"
    config_file.write_text("kubernetes:\n  pod_label_allowlist: [team]\n")
    port = _free_port()
    with api.serve() as url:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
        env = {**os.environ, "NODE_NAME": "node-a"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "kwatt", "--config", str(config_file), "--kubernetes", "on",
             "--kubeconfig", str(kubeconfig), "--path.sysfs", str(node.sysfs),
             "--path.procfs", str(node.procfs), "--gpu", "off", "--interval", "200ms",
             "--web.listen-address", f"127.0.0.1:{port}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            text = ""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                node.add_cpu(cart.path, 0.2)
                node.add_node_cpu(idle_seconds=0.4)
                node.add_energy("0", 10.0)
                time.sleep(0.2)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=2) as response:
                        text = response.read().decode()
                except OSError:
                    continue
                if 'container="cart"' in text:
                    break
        finally:
            proc.terminate()
            output = proc.communicate(timeout=10)[0].decode()
    assert 'container="cart"' in text, output
    assert ('kwatt_container_energy_joules_total{component="cpu",container="cart",'
            'namespace="shop",node="node-a",pod="cart-5d8f7c-abcde",workload="cart",'
            'workload_kind="Deployment"}') in text
    assert ('kwatt_pod_info{label_team="checkout",namespace="shop",node="node-a",'
            'owner_kind="ReplicaSet",owner_name="cart-5d8f7c",'
            f'pod="cart-5d8f7c-abcde",qos_class="Burstable",uid="{uid}",workload="cart",'
            'workload_kind="Deployment"} 1.0') in text
    assert 'kwatt_source_up{node="node-a",source="kubernetes"} 1.0' in text
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_container_never_reported_is_named_by_id_once_its_pod_is_gone() -> None:
    from kwatt.ledger import WorkloadLabels
    from kwatt.workloads.cgroups import CgroupIdentity
    from kwatt.workloads.podindex import KubernetesNamer

    clock = FakeClock()
    store = PodStore(300.0, clock)
    record = pod_record(make_pod("p", namespace="ns", uid="u", containers={
        "c": "containerd://" + container_id("known")}), OwnerResolver(), ())
    assert record is not None
    store.upsert(record)
    namer = KubernetesNamer(store.current)
    ghost = CgroupIdentity("container", pod_uid="u", container_id=container_id("ghost"))
    assert namer.name(ghost) is None  # the status may still catch up: hold the energy
    store.delete(record)
    assert namer.name(ghost) == WorkloadLabels("ns", "p", container_id("ghost")[:12], "p",
                                               "Pod")
    # A container id listed under another pod does not borrow that pod's names.
    stray = CgroupIdentity("container", pod_uid="other", container_id=container_id("known"))
    assert namer.name(stray) is None
