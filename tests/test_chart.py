"""The Helm chart, rendered by a real helm and checked with the tools a cluster admin trusts.

For the default values and every helm/kwatt/ci/*-values.yaml: `helm lint --strict`, `helm
template`, every built-in object validated against the Kubernetes schemas of the oldest and
newest supported versions (kubernetes-validate --strict), checkov, promtool on the
PrometheusRule, and assertions on the pod spec. The container's flags are parsed by the
exporter's own argument parser, and the config and web-config files are materialised the
way the projected volume would mount them and loaded by the exporter's own loaders.
"""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploytools import REPO, Certs, find_tool, make_test_certs
from kwatt.config import FILE_ONLY, SETTINGS, Config, build_arg_parser, load_config
from kwatt.webconfig import load_web_config

CHART = REPO / "helm" / "kwatt"
NAMESPACE = "monitoring"
RELEASE = "kwatt"
# The Kubernetes versions the chart supports (Chart.yaml kubeVersion is the lower bound);
# the newest is the newest schema set kubernetes-validate ships.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
CI_VALUES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
CASES = ["default", *CI_VALUES]
OPERATOR_GROUP = "monitoring.coreos.com"
HOST_PATHS = {"/proc", "/sys", "/var/lib/kubelet/pod-resources"}
STATE_DIR = "/var/lib/kwatt"


def helm(*args: str, check: bool = True,
         env_kubeconfig: str | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if env_kubeconfig is not None:  # a client-side dry run must not touch a real cluster
        env = dict(os.environ, KUBECONFIG=env_kubeconfig)
    result = subprocess.run([find_tool("helm"), *args], capture_output=True, text=True,
                            timeout=120, env=env)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stderr}", pytrace=False)
    return result


def _values_args(case: str) -> list[str]:
    return [] if case == "default" else ["-f", str(CHART / "ci" / case)]


@cache
def render_text(case: str, *extra: str, chart: Path = CHART) -> str:
    return helm("template", RELEASE, str(chart), "--namespace", NAMESPACE,
                *_values_args(case), *extra).stdout


def render(case: str, *extra: str, chart: Path = CHART) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(case, *extra, chart=chart)) if doc]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = only(docs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def exporter(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["exporter"]
    container: dict[str, Any] = containers[0]
    return container


# --------------------------------------------------------------------------- chart metadata


def test_app_version_is_the_package_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == project["version"]
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"


def test_every_ci_scenario_exists() -> None:
    assert CI_VALUES == ["dashboards-values.yaml", "gpu-node-values.yaml",
                         "non-root-values.yaml", "prometheus-operator-values.yaml",
                         "tls-values.yaml"]


# --------------------------------------------------------------------------- helm itself


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict(case: str) -> None:
    result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                  *_values_args(case))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_builtin_objects_validate_against_kubernetes_schemas(case: str,
                                                             kube_version: str) -> None:
    docs = render(case, "--kube-version", kube_version)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(OPERATOR_GROUP + "/"):
            continue  # CRDs: checked field by field below
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{case} {doc['kind']}/{doc['metadata']['name']} at {where} "
                        f"(Kubernetes {kube_version}): {exc.message}", pytrace=False)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_chart_made_tls_secret_validates(kube_version: str, certs: Certs) -> None:
    docs = render("default", "--kube-version", kube_version, "--set", "web.tls.enabled=true",
                  "--set", "web.tls.requireClientCert=true",
                  "--set-file", f"web.tls.cert={certs.cert}",
                  "--set-file", f"web.tls.key={certs.key}", "--set-file", f"web.tls.ca={certs.ca}")
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert {s.get("type") for s in secrets} == {"kubernetes.io/tls", "Opaque"}
    for doc in docs:
        kubernetes_validate.validate(doc, kube_version, strict=True)


def test_expected_objects_per_scenario() -> None:
    base = ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "NetworkPolicy",
            "Service", "ServiceAccount"]
    assert kinds(render("default")) == base
    assert kinds(render("prometheus-operator-values.yaml")) == sorted(
        [*base, "PrometheusRule", "ServiceMonitor"])
    assert kinds(render("tls-values.yaml")) == sorted([*base, "Secret", "ServiceMonitor"])
    dashboards = len(list((CHART / "files").glob("*.json")))
    assert kinds(render("dashboards-values.yaml")) == sorted(base + ["ConfigMap"] * dashboards)


@pytest.mark.parametrize(("flag", "problem"), [
    ("runAsRoot=yes", "/runAsRoot"),
    ("config.interval=true", "/config/interval"),
    ("config.pue=high", "/config/pue"),
    ("containerPort=metrics", "/containerPort"),
    ("serviceMonitor.interval=30", "/serviceMonitor/interval"),
    ("web.basicAuth.users.prometheus=plaintext", "/web/basicAuth/users/prometheus"),
    ("noSuchKey=1", "noSuchKey"),
    ("config.no_such_key=1", "no_such_key"),
])
def test_schema_rejects_wrong_types_and_unknown_keys(flag: str, problem: str) -> None:
    for command in ("template", "lint"):
        args = ([command, RELEASE, str(CHART)] if command == "template"
                else [command, "--strict", str(CHART)])
        result = helm(*args, "--set-string" if "yes" in flag or "plaintext" in flag
                      else "--set", flag, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"helm {command} accepted {flag}"
        assert "schema" in output and problem in output, output


@pytest.mark.parametrize(("values", "message"), [
    (["serviceMonitor.enabled=true", "podMonitor.enabled=true"], "pick one"),
    (["web.tls.enabled=true"], "web.tls.existingSecret, or both web.tls.cert"),
    (["web.tls.requireClientCert=true"], "needs web.tls.enabled"),
    (["serviceMonitor.enabled=true",
      "web.basicAuth.users.p=$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG"],
     "serviceMonitor.basicAuth is empty"),
])
def test_inconsistent_values_fail_with_the_reason(values: list[str], message: str) -> None:
    args = [a for v in values for a in ("--set", v)]
    result = helm("template", RELEASE, str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


# --------------------------------------------------------------------------- pod spec


@pytest.mark.parametrize("case", CASES)
def test_pod_is_locked_down(case: str) -> None:
    docs = render(case)
    spec = pod_spec(docs)
    container = exporter(docs)
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["hostNetwork"] is False
    assert spec["hostIPC"] is False
    assert spec["hostPID"] is (case == "gpu-node-values.yaml")
    if case == "non-root-values.yaml":
        assert spec["securityContext"]["runAsUser"] == 65534
        assert spec["securityContext"]["runAsGroup"] == 65534
        assert spec["securityContext"]["runAsNonRoot"] is True
    else:
        assert spec["securityContext"]["runAsUser"] == 0
    assert "initContainers" not in spec


@pytest.mark.parametrize("case", CASES)
def test_every_host_path_is_read_only(case: str) -> None:
    docs = render(case)
    spec = pod_spec(docs)
    host_volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]
                    if "hostPath" in v}
    # The restart state directory, only when running as root (kubelet creates it root-owned).
    keeps_state = case != "non-root-values.yaml"
    assert set(host_volumes.values()) == HOST_PATHS | ({STATE_DIR} if keeps_state else set())
    mounts = {m["name"]: m for m in exporter(docs)["volumeMounts"]}
    args = exporter(docs)["args"]
    if keeps_state:
        assert mounts["state"]["mountPath"] == STATE_DIR
        assert mounts["state"]["readOnly"] is False
        assert f"--state.file={STATE_DIR}/state.json" in args
        assert spec["volumes"][[v["name"] for v in spec["volumes"]].index("state")][
            "hostPath"]["type"] == "DirectoryOrCreate"
    else:
        assert "state" not in mounts
        assert not any(a.startswith("--state.file") for a in args)
    # Everything else is read-only: the exporter writes nothing but its state file.
    assert all(m.get("readOnly") is True for n, m in mounts.items() if n != "state")
    assert mounts["host-proc"]["mountPath"] == "/host/proc"
    assert mounts["host-sys"]["mountPath"] == "/host/sys"


@pytest.mark.parametrize("case", CASES)
def test_scheduling_defaults(case: str) -> None:
    docs = render(case)
    spec = pod_spec(docs)
    daemonset = only(docs, "DaemonSet")
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["nodeSelector"]["kubernetes.io/os"] == "linux"
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    container = exporter(docs)
    assert container["ports"] == [{"name": "metrics", "containerPort": 9877,
                                   "protocol": "TCP"}]
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"memory"}  # no CPU limit: see values.yaml
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    gpu = case == "gpu-node-values.yaml"
    assert (spec.get("runtimeClassName") == "nvidia") is gpu
    assert ("NVIDIA_VISIBLE_DEVICES" in env) is gpu
    if gpu:
        assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
        assert spec["priorityClassName"] == "system-node-critical"


@pytest.mark.parametrize("case", CASES)
def test_probes_hit_healthz_on_the_metrics_port(case: str) -> None:
    container = exporter(render(case))
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        if case == "tls-values.yaml":
            # Client certificates are required; kubelet cannot present one.
            assert probe["tcpSocket"] == {"port": "metrics"}
        else:
            assert probe["httpGet"] == {"path": "/healthz", "port": "metrics",
                                        "scheme": "HTTP"}
    tls = exporter(render("default", "--set", "web.tls.enabled=true", "--set",
                          "web.tls.existingSecret=x"))
    assert tls["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"


def _projected_files(docs: list[dict[str, Any]], spec: dict[str, Any],
                     secrets: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
    """The files kubelet would put in the projected config volume."""
    volume = next(v for v in spec["volumes"] if v["name"] == "config")
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    files: dict[str, bytes] = {}
    for source in volume["projected"]["sources"]:
        if "configMap" in source:
            data = {k: v.encode() for k, v in
                    by_name[("ConfigMap", source["configMap"]["name"])]["data"].items()}
            items = source["configMap"].get("items")
        else:
            name = source["secret"]["name"]
            secret = by_name.get(("Secret", name))
            if secret is None:
                data = secrets[name]  # an existing Secret the admin provides
            else:
                data = {k: v.encode() for k, v in secret.get("stringData", {}).items()}
                data |= {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
            items = source["secret"].get("items")
        if items is None:
            files.update(data)
        else:
            files.update({item["path"]: data[item["key"]] for item in items})
    return files


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_test_certs(tmp_path_factory.mktemp("chart-certs"))


def _mount_config(case: str, tmp_path: Path, certs: Certs,
                  *extra: str) -> tuple[list[str], Path]:
    """Render, write the projected volume to tmp_path, return the args pointing there."""
    docs = render(case, *extra)
    spec = pod_spec(docs)
    mount = next(m for m in exporter(docs)["volumeMounts"] if m["name"] == "config")
    existing = {"kwatt-tls": {"tls.crt": certs.cert.read_bytes(),
                              "tls.key": certs.key.read_bytes(),
                              "ca.crt": certs.ca.read_bytes()}}
    for name, content in _projected_files(docs, spec, existing).items():
        if name.endswith((".yaml", ".yml")):  # the files name each other by mount path
            content = content.replace(mount["mountPath"].encode(), str(tmp_path).encode())
        (tmp_path / name).write_bytes(content)
    args = [a.replace(mount["mountPath"], str(tmp_path)) for a in exporter(docs)["args"]]
    return args, tmp_path


@pytest.mark.parametrize("case", CASES)
def test_args_and_config_load_with_the_exporters_own_parser(case: str, tmp_path: Path,
                                                            certs: Certs) -> None:
    docs = render(case)
    raw_args = exporter(docs)["args"]
    parsed = build_arg_parser().parse_args(raw_args)  # raises on an unknown flag
    assert parsed.config == "/etc/kwatt/config.yaml"

    args, mounted = _mount_config(case, tmp_path, certs)
    config = load_config(args, env={"NODE_NAME": "node-a"})
    assert config.node_name == "node-a"
    assert config.procfs == "/host/proc" and config.sysfs == "/host/sys"
    assert config.kubernetes == "on"
    assert config.listen_address == ":9877"
    pod_resources = next(m for m in exporter(docs)["volumeMounts"]
                         if m["name"] == "pod-resources")["mountPath"]
    assert config.pod_resources_socket == f"{pod_resources}/kubelet.sock"
    if case == "tls-values.yaml":
        assert config.web_config_file is not None
        web = load_web_config(config.web_config_file)
        assert web.tls is not None
        assert web.tls.client_auth_type == "RequireAndVerifyClientCert"
        assert web.tls.min_version == "TLS13"
        assert Path(web.tls.cert_file).parent == mounted
        assert set(web.basic_auth_users) == {"prometheus"}
    else:
        assert config.web_config_file is None
    if case == "prometheus-operator-values.yaml":
        assert config.carbon_intensity_grams_per_kwh == 350
        assert (config.energy_price_per_kwh, config.energy_price_currency) == (0.21, "EUR")
        assert config.pue == 1.4
        assert config.attribution.idle_policy == "cpu-request"
        assert config.pod_label_allowlist == ("team", "app.kubernetes.io/name")


def test_inline_tls_certificate_becomes_a_secret_the_exporter_loads(tmp_path: Path,
                                                                     certs: Certs) -> None:
    args, _ = _mount_config("default", tmp_path, certs, "--set", "web.tls.enabled=true",
                            "--set-file", f"web.tls.cert={certs.cert}",
                            "--set-file", f"web.tls.key={certs.key}")
    config = load_config(args, env={"NODE_NAME": "node-a"})
    assert config.web_config_file is not None
    web = load_web_config(config.web_config_file)  # also loads the key pair
    assert web.tls is not None and web.tls.client_auth_type == "NoClientCert"
    assert not web.basic_auth_users


def test_chart_config_defaults_are_the_exporters_defaults(tmp_path: Path,
                                                          certs: Certs) -> None:
    args, _ = _mount_config("default", tmp_path, certs)
    from_chart = load_config(args, env={"NODE_NAME": "n"})
    defaults = load_config([], env={"NODE_NAME": "n"})
    flags = {"procfs", "sysfs", "kubernetes", "pod_resources_socket", "listen_address",
             "state_file"}  # the chart keeps restart state on the node; host mode does not
    for name in Config.__dataclass_fields__:
        if name not in flags:
            assert getattr(from_chart, name) == getattr(defaults, name), name


def _flatten(prefix: str, node: dict[str, Any]) -> Iterator[str]:
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flatten(path, value)
        else:
            yield path


def test_values_config_keys_are_exporter_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart_keys = set(_flatten("", values["config"]))
    exporter_keys = {s.yaml_path for s in SETTINGS} | set(FILE_ONLY)
    assert chart_keys <= exporter_keys, chart_keys - exporter_keys
    # Every file-only key is settable from the chart, except these (with the reason), so a
    # new exporter key fails here until the chart exposes it or says why not.
    not_in_chart = {
        "kubernetes.service_account_dir",  # the pod's token mount is fixed by Kubernetes
        "host.docker_root",  # host mode only: names Docker containers outside Kubernetes
        # set from rbac.ownerKinds, so the exporter reads exactly what the ClusterRole grants
        "kubernetes.owner_lookups",
    }
    assert set(FILE_ONLY) - not_in_chart <= chart_keys, \
        set(FILE_ONLY) - not_in_chart - chart_keys
    schema = json.loads((CHART / "values.schema.json").read_text())
    schema_keys = set(_flatten_schema("", schema["properties"]["config"]))
    assert schema_keys == chart_keys


def _flatten_schema(prefix: str, node: dict[str, Any]) -> Iterator[str]:
    for key, value in node.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        if "properties" in value:
            yield from _flatten_schema(path, value)
        else:
            yield path


@pytest.mark.parametrize("case", CASES)
def test_notes_say_how_to_see_the_metrics(case: str, tmp_path: Path) -> None:
    result = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                  "--dry-run=client", *_values_args(case),
                  env_kubeconfig=str(tmp_path / "no-cluster"))
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"port-forward daemonset/{RELEASE} 9877:metrics" in notes
    scheme = "https" if case == "tls-values.yaml" else "http"
    assert f"{scheme}://localhost:9877/metrics" in notes
    assert ("-u <user>:<password>" in notes) is (case == "tls-values.yaml")
    assert ("estimated" in notes) is (case == "non-root-values.yaml")


# --------------------------------------------------------------------------- RBAC


def test_cluster_role_is_least_privilege_and_commented() -> None:
    role = only(render("default"), "ClusterRole")
    get = ["get"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["replicasets", "statefulsets"], "verbs": get},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": get},
        {"apiGroups": ["jobset.x-k8s.io"], "resources": ["jobsets"], "verbs": get},
        {"apiGroups": ["kubeflow.org"], "resources": ["mpijobs", "pytorchjobs"], "verbs": get},
        {"apiGroups": ["leaderworkerset.x-k8s.io"], "resources": ["leaderworkersets"],
         "verbs": get},
        {"apiGroups": ["ray.io"], "resources": ["rayclusters", "rayjobs", "rayservices"],
         "verbs": get},
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
         "verbs": get},
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": get},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"],
         "verbs": ["list", "watch"]},
    ]
    without = only(render("default", "--set", "rbac.ownerLookups=false"), "ClusterRole")
    assert without["rules"] == role["rules"][:1] + role["rules"][-1:]
    template = (CHART / "templates" / "clusterrole.yaml").read_text().splitlines()
    for index, line in enumerate(template):
        if line.strip().startswith("- apiGroups:"):
            assert template[index - 1].strip().startswith("#"), f"rule at line {index + 1}"
    binding = only(render("default"), "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kwatt",
                                    "namespace": NAMESPACE}]
    assert pod_spec(render("default"))["serviceAccountName"] == "kwatt"


def _exporter_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
    loaded: dict[str, Any] = yaml.safe_load(maps[0]["data"]["config.yaml"])
    return loaded


def test_owner_kinds_are_granted_get_and_read_by_the_exporter_alike(tmp_path: Path) -> None:
    """The ClusterRole grants get on exactly the kinds the exporter is told to read, and
    the exporter's own config loader accepts the list."""
    docs = render("default", "--set", "rbac.ownerKinds={jobs.batch,rayclusters.ray.io,"
                  "notebooks.kubeflow.org}")
    assert only(docs, "ClusterRole")["rules"][1:-1] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["notebooks"], "verbs": ["get"]},
        {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get"]},
    ]
    lookups = _exporter_config(docs)["kubernetes"]["owner_lookups"]
    assert lookups == ["jobs.batch", "rayclusters.ray.io", "notebooks.kubeflow.org"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_exporter_config(docs)))
    config = load_config(["--config", str(path)], env={"NODE_NAME": "n"})
    assert config.owner_lookups == tuple(lookups)
    off = render("default", "--set", "rbac.ownerLookups=false")
    assert _exporter_config(off)["kubernetes"]["owner_lookups"] == []
    bad = helm("template", RELEASE, str(CHART), "--set", "rbac.ownerKinds={Jobs}",
               check=False)
    assert bad.returncode != 0 and "ownerKinds" in bad.stderr


def test_resource_slice_rule_and_the_exporter_flag_follow_one_value() -> None:
    """DRA: the ResourceSlice rule exists only when rbac.resourceSlices is on; off also
    turns the exporter's ResourceSlice watch off, so it never collects 403s."""
    on = render("default")
    off = render("default", "--set", "rbac.resourceSlices=false")
    slice_rule = {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"],
                  "verbs": ["list", "watch"]}
    assert slice_rule in only(on, "ClusterRole")["rules"]
    assert slice_rule not in only(off, "ClusterRole")["rules"]
    args_on = pod_spec(on)["containers"][0]["args"]
    args_off = pod_spec(off)["containers"][0]["args"]
    assert not any(a.startswith("--gpu.dra") for a in args_on)
    assert "--gpu.dra=off" in args_off
    assert load_config([a for a in args_off if not a.startswith("--config")],
                       env={"NODE_NAME": "n"}).gpu_dra == "off"


# --------------------------------------------------------------------------- monitoring


def _selected_by(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("case", ["prometheus-operator-values.yaml", "tls-values.yaml"])
def test_service_monitor_scrapes_the_exporter(case: str) -> None:
    docs = render(case)
    monitor = only(docs, "ServiceMonitor")
    service = only(docs, "Service")
    assert _selected_by(monitor["spec"]["selector"]["matchLabels"],
                        service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [
        service["metadata"]["namespace"]]
    assert service["spec"]["ports"][0]["name"] == "metrics"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert _selected_by(service["spec"]["selector"],
                        only(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True
    assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])
    if case == "tls-values.yaml":
        assert endpoint["scheme"] == "https"
        assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "kwatt-tls", "key": "ca.crt"}
        assert set(endpoint["basicAuth"]) == {"username", "password"}
    else:
        assert endpoint["scheme"] == "http"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        for relabeling in endpoint["relabelings"] + endpoint["metricRelabelings"]:
            assert isinstance(relabeling["sourceLabels"], list)


def test_pod_monitor_scrapes_the_exporter() -> None:
    docs = render("default", "--set", "podMonitor.enabled=true", "--set",
                  "podMonitor.interval=20s")
    monitor = only(docs, "PodMonitor")
    pod_labels = only(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert _selected_by(monitor["spec"]["selector"]["matchLabels"], pod_labels)
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert endpoint["interval"] == "20s" and endpoint["scheme"] == "http"
    assert "metrics" in [p["name"] for p in exporter(docs)["ports"]]


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def test_prometheus_rule_passes_promtool_and_equals_the_shipped_rules(tmp_path: Path) -> None:
    rule = only(render("prometheus-operator-values.yaml"), "PrometheusRule")
    groups = rule["spec"]["groups"]
    shipped = yaml.safe_load((REPO / "dashboards" / "rules" / "kwatt-rules.yaml").read_text())
    assert groups == shipped["groups"]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run([find_tool("promtool"), "check", "rules", str(rules_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_templates_pass_through_the_chart_unexpanded(tmp_path: Path) -> None:
    chart = tmp_path / "kwatt"
    shutil.copytree(CHART, chart)
    rules = {"groups": [{"name": "t", "rules": [{
        "alert": "KwattTest", "expr": 'up{job="__KWATT_job__"} == 0',
        "annotations": {"summary": "{{ $labels.node }} is {{ $value }} for __KWATT_job__"}}]}]}
    (chart / "files" / "kwatt-rules.chart.yaml").write_text(yaml.safe_dump(rules))
    rule = only(render("default", "--set", "prometheusRule.enabled=true", chart=chart),
                "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    assert group["rules"][0]["annotations"] == {"summary": "{{ $labels.node }} is {{ $value }}"
                                                " for kwatt"}
    assert group["rules"][0]["expr"] == 'up{job="kwatt"} == 0'


def test_dashboards_become_labelled_config_maps(tmp_path: Path) -> None:
    chart = tmp_path / "kwatt"
    shutil.copytree(CHART, chart)
    dashboard = json.dumps({"title": "kwatt test", "panels": [{"expr": "{{ not_a_tpl }}"}]})
    (chart / "files" / "kwatt-test.json").write_text(dashboard)
    docs = render("dashboards-values.yaml", chart=chart)
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "kwatt-test.json" in d["data"]]
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert maps[0]["metadata"]["annotations"] == {"grafana_folder": "Energy"}
    assert json.loads(maps[0]["data"]["kwatt-test.json"]) == json.loads(dashboard)
    custom = render("default", "--set", "dashboards.enabled=true", "--set",
                    "dashboards.label=my_dashboards", "--set-string",
                    "dashboards.labelValue=yes", chart=chart)
    # One ConfigMap per dashboard in files/: the shipped ones plus the test's.
    labelled = [d for d in custom if "my_dashboards" in d["metadata"]["labels"]]
    assert len(labelled) == len(list((chart / "files").glob("*.json")))
    assert {d["metadata"]["labels"]["my_dashboards"] for d in labelled} == {"yes"}


def test_network_policy_is_on_by_default_and_admits_only_prometheus() -> None:
    """With TLS and auth off by default, the policy is what keeps other pods off /metrics:
    the defaults admit the Prometheus pods (app.kubernetes.io/name=prometheus, as the
    Prometheus Operator labels them) of the monitoring namespace, to the metrics port."""
    docs = render("default")
    policy = only(docs, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # It selects exactly the exporter pods.
    pod_labels = only(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()
    (rule,) = policy["spec"]["ingress"]
    container_ports = {p["name"] for p in exporter(docs)["ports"]}
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert "metrics" in container_ports
    # One peer: Prometheus pods AND the monitoring namespace (both in the same element).
    assert rule["from"] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }]
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(policy, kube_version, strict=True)


def test_network_policy_selectors_are_values() -> None:
    ours = only(render("default", "--set",
                       "networkPolicy.namespaceSelector.matchLabels.team=observability",
                       "--set", "networkPolicy.podSelector.matchLabels.prometheus=k8s",
                       "--set-json", 'networkPolicy.from=[{"ipBlock":{"cidr":"10.0.0.0/8"}}]'),
                "NetworkPolicy")
    (rule,) = ours["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring",
                                               "team": "observability"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus",
                                         "prometheus": "k8s"}}},
        {"ipBlock": {"cidr": "10.0.0.0/8"}},
    ]
    # null drops a selector: pods of the release namespace only, as NetworkPolicy means it.
    own = only(render("default", "--set", "networkPolicy.namespaceSelector=null"),
               "NetworkPolicy")
    assert own["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    # Both dropped and no extra peers: any source, which must be said, not implied.
    anyone = only(render("default", "--set", "networkPolicy.namespaceSelector=null",
                         "--set", "networkPolicy.podSelector=null"), "NetworkPolicy")
    assert "from" not in anyone["spec"]["ingress"][0]
    assert "NetworkPolicy" not in kinds(render("default", "--set",
                                               "networkPolicy.enabled=false"))


# --------------------------------------------------------------------------- checkov

# Checks the chart fails on purpose, with the reason and the scenarios it applies to.
# Everything else must pass.
ROOT_CASES = frozenset(CASES) - {"non-root-values.yaml"}
CHECKOV_SKIPS: dict[str, frozenset[str]] = {
    # Image digest: unknown until the image is pushed; image.digest pins it when set.
    "CKV_K8S_43": frozenset(CASES),
    # Service-account token: the exporter watches pods through the API server.
    "CKV_K8S_38": frozenset(CASES),
    # imagePullPolicy Always: version tags are immutable; Always would make every node's
    # restart depend on the registry.
    "CKV_K8S_15": frozenset(CASES),
    # CPU limit: CFS throttling delays samples, which skews attribution (values.yaml).
    "CKV_K8S_11": frozenset(CASES),
    # Root: RAPL energy_uj is root-only (CVE-2020-8694); runAsRoot=false on hosts without
    # RAPL, and the non-root scenario passes both checks.
    "CKV_K8S_23": ROOT_CASES,
    "CKV_K8S_40": ROOT_CASES,
    # hostPID: only gpu.hostPID=true (shared-GPU per-process split) turns it on.
    "CKV_K8S_17": frozenset({"gpu-node-values.yaml"}),
}


@pytest.mark.slow
def test_checkov_passes_on_rendered_manifests(tmp_path: Path) -> None:
    checkov = find_tool("checkov", REPO / ".tools" / "checkov-venv" / "bin")
    failures: list[str] = []
    for case in CASES:
        skips = [check for check, cases in CHECKOV_SKIPS.items() if case in cases]
        directory = tmp_path / case.removesuffix(".yaml")
        directory.mkdir()
        (directory / "manifests.yaml").write_text(render_text(case))
        result = subprocess.run(
            [checkov, "--directory", str(directory), "--framework", "kubernetes",
             "--output", "json", "--quiet", "--compact", "--skip-download",
             "--skip-check", ",".join(skips)],
            capture_output=True, text=True, timeout=300, env=_checkov_env())
        report = json.loads(result.stdout)
        reports = report if isinstance(report, list) else [report]
        passed = sum(r["summary"]["passed"] for r in reports)
        assert passed > 20, result.stdout[:2000]
        for r in reports:
            for failed in r["results"]["failed_checks"]:
                failures.append(f"{case}: {failed['check_id']} {failed['check_name']} "
                                f"({failed['resource']})")
    assert not failures, "\n".join(failures)


def _checkov_env() -> dict[str, str]:
    env = dict(os.environ)
    env["BC_SKIP_MAPPING"] = "TRUE"  # no network lookups of check guidelines
    return env


# --------------------------------------------------------------------------- generated files


def test_chart_files_are_copies_of_the_shipped_rules_and_dashboards() -> None:
    sources = {p.name: p.read_bytes() for p in
               [*(REPO / "dashboards" / "chart").glob("*.yaml"),
                *(REPO / "dashboards" / "grafana").glob("*.json")]}
    copies = {p.name: p.read_bytes() for p in
              [*(CHART / "files").glob("*.yaml"), *(CHART / "files").glob("*.json")]}
    assert "kwatt-rules.chart.yaml" in sources
    assert copies == sources, "run scripts/sync-chart-files"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sync-chart-files"),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_sync_check_notices_a_stale_copy(tmp_path: Path) -> None:
    for part in ("scripts/sync-chart-files", "dashboards/chart/kwatt-rules.chart.yaml",
                 "helm/kwatt/files/kwatt-rules.chart.yaml"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / part, tmp_path / part)
    (tmp_path / "dashboards" / "chart" / "kwatt-rules.chart.yaml").write_text("groups: []\n")
    (tmp_path / "dashboards" / "grafana").mkdir()
    (tmp_path / "dashboards" / "grafana" / "new.json").write_text("{}")
    script = str(tmp_path / "scripts" / "sync-chart-files")
    check = subprocess.run([sys.executable, script, "--check"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 1
    assert "differs from source: kwatt-rules.chart.yaml" in check.stdout
    assert "missing in chart: new.json" in check.stdout
    subprocess.run([sys.executable, script], check=True, capture_output=True, timeout=60)
    assert (tmp_path / "helm/kwatt/files/new.json").read_text() == "{}"
    assert subprocess.run([sys.executable, script, "--check"], timeout=60).returncode == 0


def test_values_table_in_readme_is_generated_from_values_yaml() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-values-table"),
                             "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = (REPO / "README.md").read_text()
    for key in ("runAsRoot", "gpu.hostPID", "config.attribution.idle_policy",
                "web.basicAuth.users", "serviceMonitor.tlsConfig"):
        assert f"| `{key}` |" in doc


def test_values_table_generator_refuses_an_undocumented_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(REPO / "scripts" / "gen-values-table")
    loader = importlib.machinery.SourceFileLoader("gen_values_table", path)
    spec = importlib.util.spec_from_loader("gen_values_table", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gen_values_table", module)
    loader.exec_module(module)
    table = module.table
    assert "| `a.b` | `1` | Documented. |" in table("a:\n  # Documented.\n  b: 1\n")
    with pytest.raises(SystemExit, match=r"a\.c"):
        table("a:\n  # Documented.\n  b: 1\n  c: 2\n")


# --------------------------------------------------------------------------- grid signals


def test_read_node_rule_only_when_enabled_and_commented() -> None:
    default = only(render("default"), "ClusterRole")["rules"]
    assert not any("nodes" in rule["resources"] for rule in default)
    rules = only(render("default", "--set", "rbac.readNode=true"), "ClusterRole")["rules"]
    node_rule = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}
    assert [rule for rule in rules if rule != node_rule] == default
    assert rules.count(node_rule) == 1


def test_signal_credentials_and_files_are_mounted_read_only(tmp_path: Path,
                                                            certs: Certs) -> None:
    assert not {"signal-credentials", "signal-files"} & {
        m["name"] for m in exporter(render("default"))["volumeMounts"]}
    extra = ("--set", "signalCredentials.secretName=grid-api",
             "--set", "signalFiles.configMapName=grid-files",
             "--set", "config.carbon.source=electricitymaps",
             "--set", "config.carbon.zone_node_label=topology.kubernetes.io/region",
             "--set", "config.carbon.token_file=/etc/kwatt-credentials/token",
             "--set", "config.carbon.ca_file=/etc/kwatt-credentials/ca.crt",
             "--set", "config.carbon.period=1m", "--set", "config.carbon.grace=5m",
             "--set", "config.cost.source=file",
             "--set", "config.cost.file=/etc/kwatt-signals/price.yaml",
             "--set", "config.cost.zone_by_node={node-a=tariff-a,node-b=tariff-b}")
    docs = render("default", *extra)
    mounts = {m["name"]: m for m in exporter(docs)["volumeMounts"]}
    assert mounts["signal-credentials"] == {"name": "signal-credentials", "readOnly": True,
                                            "mountPath": "/etc/kwatt-credentials"}
    assert mounts["signal-files"] == {"name": "signal-files", "readOnly": True,
                                      "mountPath": "/etc/kwatt-signals"}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["signal-credentials"]["secret"]["secretName"] == "grid-api"
    assert volumes["signal-files"]["configMap"]["name"] == "grid-files"
    args, _ = _mount_config("default", tmp_path, certs, *extra)
    config = load_config(args, env={"NODE_NAME": "node-a"})
    carbon = config.carbon_source
    # (_mount_config moved /etc/kwatt* under tmp_path)
    assert carbon.token_file.endswith("-credentials/token")
    assert carbon.ca_file.endswith("-credentials/ca.crt")
    assert (carbon.source, carbon.zone_node_label, carbon.period_seconds,
            carbon.grace_seconds, carbon.timeout_seconds) == (
        "electricitymaps", "topology.kubernetes.io/region", 60.0, 300.0, 10.0)
    assert config.price_source.source == "file"
    assert config.price_source.zone_for("node-a") == "tariff-a"
    assert config.price_source.zone_for("node-b") == "tariff-b"


@pytest.mark.parametrize(("flag", "problem"), [
    ("config.carbon.source=watttime", "carbon"),
    ("config.cost.period=soon", "period"),
    ("rbac.readNode=maybe", "readNode"),
])
def test_schema_rejects_bad_signal_values(flag: str, problem: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--set", flag, check=False)
    assert result.returncode != 0 and problem in result.stderr


def test_embodied_by_node_labels_reach_the_exporter_and_need_read_node(
        tmp_path: Path, certs: Certs) -> None:
    values = tmp_path / "embodied.yaml"
    values.write_text(
        "rbac:\n  readNode: true\n"
        "config:\n  embodied:\n    kg_co2e: 1500\n    by_node_labels:\n"
        "      - match: {node.kubernetes.io/instance-type: p5.48xlarge}\n"
        "        kg_co2e: 12000\n        lifetime_years: 5\n")
    args, _ = _mount_config("default", tmp_path, certs, "-f", str(values))
    config = load_config(args, env={"NODE_NAME": "node-a"})
    assert [(r.match, r.kg_co2e, r.lifetime_years) for r in config.embodied_by_node_labels] \
        == [((("node.kubernetes.io/instance-type", "p5.48xlarge"),), 12000.0, 5.0)]
    assert config.embodied_kg_co2e == 1500.0
    rules = only(render("default", "-f", str(values)), "ClusterRole")["rules"]
    assert {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]} in rules
    # without the node read the entries could never match: the render says so
    result = helm("template", RELEASE, str(CHART), "-f", str(values),
                  "--set", "rbac.readNode=false", check=False)
    assert result.returncode != 0 and "rbac.readNode" in result.stderr
    bad = helm("template", RELEASE, str(CHART), "-f", str(values),
               "--set", "config.embodied.by_node_labels[0].kg_co2e=-1", check=False)
    assert bad.returncode != 0 and "kg_co2e" in bad.stderr
