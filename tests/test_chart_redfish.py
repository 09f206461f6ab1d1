"""The chart's Redfish Secret mount and the optional node read: rendered, validated against
the Kubernetes schemas, and loaded by the exporter's own parser."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from kwatt.config import load_config
from test_chart import KUBE_VERSIONS, exporter, pod_spec, render

REDFISH = ["--set", "redfish.credentialsSecret=bmc-creds", "--set", "redfish.caKey=ca.pem",
           "--set", "config.redfish.url=https://{node}-bmc.mgmt.example",
           "--set", "config.kubernetes.read_node=true"]


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    rules: list[dict[str, Any]] = role["rules"]
    return rules


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_redfish_and_node_read_render_valid_objects(kube_version: str) -> None:
    for doc in render("default", "--kube-version", kube_version, *REDFISH):
        if doc["kind"] in ("DaemonSet", "ClusterRole"):
            kubernetes_validate.validate(doc, kube_version, strict=True)


def test_secret_is_mounted_read_only_and_the_exporter_loads_the_args() -> None:
    docs = render("default", *REDFISH)
    container = exporter(docs)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "redfish")
    assert mount == {"name": "redfish", "mountPath": "/etc/kwatt-redfish", "readOnly": True}
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "redfish")
    assert volume["secret"]["secretName"] == "bmc-creds"
    assert [i["path"] for i in volume["secret"]["items"]] == ["username", "password", "ca.crt"]
    args = [a for a in container["args"] if a.startswith("--redfish.")]
    assert args == ["--redfish.username-file=/etc/kwatt-redfish/username",
                    "--redfish.password-file=/etc/kwatt-redfish/password",
                    "--redfish.ca-file=/etc/kwatt-redfish/ca.crt"]
    config = load_config([*args, "--redfish.url", "https://{node}-bmc.mgmt.example"],
                         env={"NODE_NAME": "gpu-7"})
    assert config.redfish_ca_file == "/etc/kwatt-redfish/ca.crt"
    assert {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]} in _rules(docs)


def test_defaults_add_neither() -> None:
    docs = render("default")
    assert all(v["name"] != "redfish" for v in pod_spec(docs)["volumes"])
    assert not any(a.startswith("--redfish.") for a in exporter(docs)["args"])
    assert all("nodes" not in r["resources"] for r in _rules(docs))
