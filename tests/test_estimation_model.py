"""Estimation-model coefficients chosen per node: /proc/cpuinfo, the instance-type label,
configuration; and the Exporter using them and saying which (kwatt_estimation_model_info).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FIXTURES
from fake_kube_api import FakeKubeApi, write_kubeconfig
from kwatt.config import ModelConfig, load_config
from kwatt.exporter import Exporter
from kwatt.sources.model import choose_coefficients, microarchitecture_from_cpuinfo
from kwatt.workloads.kubernetes import api_client_for
from kwatt.workloads.node import node_instance_type
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode

CPUINFO = FIXTURES / "cpuinfo"


def cpuinfo(name: str) -> str:
    return (CPUINFO / name).read_text()


@pytest.mark.parametrize(("fixture", "arch"), [
    ("intel-cascade-lake", "Cascade Lake"),
    ("intel-skylake-sp", "Skylake"),
    ("intel-ice-lake", "Ice Lake"),
    ("amd-epyc-rome", "AMD EPYC 2nd Gen"),
    ("amd-epyc-milan", "AMD EPYC 3rd Gen"),
    ("aws-graviton2", "AWS Graviton2"),
    ("nvidia-grace", "Neoverse V2"),
    ("qemu-masked", None),
])
def test_microarchitecture_from_cpuinfo(fixture: str, arch: str | None) -> None:
    assert microarchitecture_from_cpuinfo(cpuinfo(fixture)) == arch


@pytest.mark.parametrize(("fixture", "instance_type", "expected"), [
    # CCF per-microarchitecture numbers (docs/metrics.md, "Estimation model").
    ("intel-cascade-lake", None, (0.64, 3.97, "cpuinfo", "Cascade Lake")),
    ("amd-epyc-milan", "m6a.large", (0.45, 2.02, "cpuinfo", "AMD EPYC 3rd Gen")),
    # The silicon wins over the label.
    ("intel-skylake-sp", "m5n.large", (0.65, 4.26, "cpuinfo", "Skylake")),
    # Masked CPU: the label; m5 is Cascade Lake or Skylake, averaged as CCF does.
    ("qemu-masked", "m5.xlarge", (0.645, 4.115, "instance-type", "Cascade Lake + Skylake")),
    ("qemu-masked", "c6g.2xlarge", (0.47, 1.69, "instance-type", "AWS Graviton2")),
    # Recognised, but CCF has no numbers: the defaults, with the name kept.
    ("intel-ice-lake", "c6i.large", (0.74, 3.5, "default", "Ice Lake")),
    ("nvidia-grace", None, (0.74, 3.5, "default", "Neoverse V2")),
    ("qemu-masked", "n2-standard-4", (0.74, 3.5, "default", "")),
    (None, None, (0.74, 3.5, "default", "")),
])
def test_choose_coefficients(fixture: str | None, instance_type: str | None,
                             expected: tuple[float, float, str, str]) -> None:
    chosen = choose_coefficients(ModelConfig(), cpuinfo(fixture) if fixture else None,
                                 instance_type)
    assert (chosen.idle_watts_per_vcpu, chosen.max_watts_per_vcpu, chosen.basis,
            chosen.microarchitecture) == pytest.approx(expected)
    assert chosen.instance_type == (instance_type or "")


def test_configured_coefficients_win(tmp_path: Path) -> None:
    cfg = tmp_path / "kwatt.yaml"
    cfg.write_text("model:\n  cpu_watts_idle_per_vcpu: 1.5\n")
    model = load_config(["--config", str(cfg), "--node-name", "n"], env={}).model
    assert model.auto_coefficients is False
    chosen = choose_coefficients(model, cpuinfo("intel-cascade-lake"), "m5.large")
    assert (chosen.idle_watts_per_vcpu, chosen.max_watts_per_vcpu, chosen.basis) == (
        1.5, 3.5, "configured")
    assert load_config(["--node-name", "n"], env={}).model.auto_coefficients is True


def _metrics(exporter: Exporter) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(exporter.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_exporter_estimates_with_the_cpus_coefficients(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node", vcpus=2)
    (node.procfs / "cpuinfo").write_text(cpuinfo("aws-graviton2"))
    svc = node.add_unit("/system.slice/nginx.service")
    config = load_config(["--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
                          "--kubernetes", "off", "--gpu", "off", "--node-name", "sim"], env={})
    exporter = Exporter(config)
    exporter.sampler.sample()
    node.add_cpu(svc, 5)
    node.add_node_cpu(idle_seconds=15)  # u = 0.25
    exporter.sampler.sample()
    metrics = _metrics(exporter)
    assert metrics["kwatt_estimation_model_info"] == [(
        {"node": "sim", "basis": "cpuinfo", "microarchitecture": "AWS Graviton2",
         "instance_type": ""}, 1.0)]
    assert sorted((labels["bound"], value) for labels, value in
                  metrics["kwatt_estimation_model_cpu_watts_per_vcpu"]) == [
        ("idle", 0.47), ("max", 1.69)]
    # P = 2 * (0.47 + (1.69 - 0.47) * 0.25) = 1.55 W, not the 2.86 W of the AWS average.
    power = {labels["component"]: value for labels, value in metrics["kwatt_node_power_watts"]
             if labels["source"] == "estimated"}
    assert power == {"cpu": pytest.approx(1.55)}
    assert exporter.config.model.cpu_watts_idle_per_vcpu == 0.74  # as loaded: reload-safe


def _kube_exporter_config(tmp_path: Path, node: SimulatedNode, url: str, read_node: bool):
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
    cfg = tmp_path / "kwatt.yaml"
    cfg.write_text(f"kubernetes:\n  read_node: {'true' if read_node else 'false'}\n")
    return load_config(["--config", str(cfg), "--kubernetes", "on", "--node-name", "node-a",
                        "--kubeconfig", str(kubeconfig), "--gpu", "off",
                        "--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs)],
                       env={})


@pytest.mark.parametrize("read_node", [True, False])
def test_instance_type_label_read_only_when_allowed(tmp_path: Path, read_node: bool) -> None:
    node = SimulatedNode(tmp_path / "node", vcpus=2)
    (node.procfs / "cpuinfo").write_text(cpuinfo("qemu-masked"))
    api = FakeKubeApi()
    api.nodes["node-a"] = {"kind": "Node", "apiVersion": "v1", "metadata": {
        "name": "node-a", "labels": {"node.kubernetes.io/instance-type": "c6g.large"}}}
    with api.serve() as url:
        exporter = Exporter(_kube_exporter_config(tmp_path, node, url, read_node))
        try:
            info = _metrics(exporter)["kwatt_estimation_model_info"]
        finally:
            exporter.stop_watch()
        node_gets = [r for r in api.requests if r.path == "/api/v1/nodes/node-a"]
    if read_node:
        assert len(node_gets) == 1
        assert info[0][0]["basis"] == "instance-type"
        assert info[0][0]["instance_type"] == "c6g.large"
    else:
        assert node_gets == []
        assert info[0][0]["basis"] == "default"


def test_node_read_faults(tmp_path: Path) -> None:
    api = FakeKubeApi()
    with api.serve() as url:
        config = load_config(["--kubeconfig", str(write_kubeconfig(tmp_path / "kc", url)),
                              "--node-name", "node-a"], env={})
        client = api_client_for(config)
        assert node_instance_type(client, "node-a")[1].reason == "absent"  # type: ignore[union-attr]
        api.nodes["node-a"] = {"kind": "Node", "apiVersion": "v1",
                               "metadata": {"name": "node-a", "labels": {}}}
        assert node_instance_type(client, "node-a") == (None, None)
        api.forbid_nodes = True
        assert node_instance_type(client, "node-a")[1].reason == "permission"  # type: ignore[union-attr]
