"""Release plumbing: workflows lint clean and pin their actions, one version everywhere,
the Python package builds and carries what it must, kubectl's kubeconfig precedence."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, require_tool
from kwatt.config import load_config
from kwatt.workloads.kubernetes import api_client_for, kubernetes_enabled

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
ACTIONLINT = REPO / "scripts" / "actionlint"


def _project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def _actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    node = require_tool("node")
    if not (REPO / ".tools" / "actionlint" / "node.cjs").exists():
        pytest.fail("actionlint not found: run scripts/install-test-tools")
    return subprocess.run([node, str(ACTIONLINT), *map(str, files)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_workflows_pass_actionlint() -> None:
    assert WORKFLOWS, "no workflows"
    result = _actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(WORKFLOWS)} files, 0 findings" in result.stdout


def test_actionlint_reports_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ github.no_such_property }}\n")
    result = _actionlint(broken)
    assert result.returncode == 1
    assert "no_such_property" in result.stdout


def test_every_third_party_action_is_pinned_to_a_commit() -> None:
    uses = []
    for workflow in WORKFLOWS:
        for line in workflow.read_text().splitlines():
            match = re.match(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", line)
            if match:
                uses.append((workflow.name, match.group(1), match.group(2)))
    assert uses
    for name, ref, comment in uses:
        if ref.startswith("./"):
            continue
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{name}: {ref} not pinned"
        assert re.search(r"#\s*v\d", comment), f"{name}: {ref} has no version comment"


def test_release_pushes_the_image_the_chart_deploys_by_default() -> None:
    release = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    values = yaml.safe_load((REPO / "helm" / "kwatt" / "values.yaml").read_text())
    pushed = release["env"]["IMAGE"].replace("${{ github.repository_owner }}", "kwatt")
    assert values["image"]["repository"] == pushed
    assert values["image"]["tag"] == ""  # the chart's appVersion, i.e. the release
    platforms = release["jobs"]["image"]["steps"]
    build = next(s for s in platforms if s.get("id") == "build")
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"


def test_one_version_everywhere() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "version"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    chart = yaml.safe_load((REPO / "helm" / "kwatt" / "Chart.yaml").read_text())
    version = _project_version()
    assert chart["version"] == chart["appVersion"] == version
    assert f"ARG VERSION={version}\n" in (REPO / "Dockerfile").read_text()


def test_version_check_catches_a_disagreement_and_set_fixes_it(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    (copy / "helm" / "kwatt").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "version", copy / "scripts" / "version")
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    shutil.copy(REPO / "Dockerfile", copy / "Dockerfile")
    chart = (REPO / "helm" / "kwatt" / "Chart.yaml").read_text()
    (copy / "helm" / "kwatt" / "Chart.yaml").write_text(
        re.sub(r"^appVersion: .*$", 'appVersion: "9.9.9"', chart, flags=re.M))
    script = [sys.executable, str(copy / "scripts" / "version")]
    failed = subprocess.run([*script, "--check"], capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert "Chart.yaml: 9.9.9 is not the project version" in failed.stderr
    fixed = subprocess.run([*script, "--set", "1.2.3"], capture_output=True, text=True,
                           check=False)
    assert fixed.returncode == 0, fixed.stderr
    assert subprocess.run(script, capture_output=True, text=True,
                          check=True).stdout.strip() == "1.2.3"
    assert 'appVersion: "1.2.3"' in (copy / "helm" / "kwatt" / "Chart.yaml").read_text()
    assert "ARG VERSION=1.2.3" in (copy / "Dockerfile").read_text()


def test_version_flag_prints_the_package_version() -> None:
    result = subprocess.run([sys.executable, "-m", "kwatt", "--version"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"kwatt-exporter {_project_version()}"


@pytest.mark.slow
def test_sdist_and_wheel_build_pass_twine_and_carry_what_they_must(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    built = sorted(out.iterdir())
    assert sorted(p.suffix for p in built) == [".gz", ".whl"], built
    twine = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                            *map(str, built)], capture_output=True, text=True, check=False)
    assert twine.returncode == 0, twine.stdout + twine.stderr
    wheel = next(p for p in built if p.suffix == ".whl")
    assert wheel.name.startswith(f"kwatt-{_project_version()}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kwatt/py.typed" in names
    assert "kwatt/workloads/_proto/podresources_pb2.py" in names
    assert "kwatt/workloads/_proto/podresources_pb2_grpc.py" in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n
                or "fake" in n.rsplit("/", 1)[-1]], names
    licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")
               or n.endswith(".dist-info/LICENSE")]
    assert licence, names


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    return path


def _service_account(tmp_path: Path) -> Path:
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text("in-cluster-token")
    (account / "ca.crt").write_text("not checked until a request is made\n")
    return account


def test_kubeconfig_precedence_is_kubectls(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    flag = _kubeconfig(tmp_path / "flag.yaml", "https://flag.invalid:6443")
    env = _kubeconfig(tmp_path / "env.yaml", "https://env.invalid:6443")
    account = _service_account(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    base = ["--kubernetes", "on", "--node-name", "n"]
    in_cluster = {"KWATT_KUBERNETES_SERVICE_ACCOUNT_DIR": str(account)}

    def host(argv: list[str], environ: dict[str, str]) -> str:
        config = load_config(argv, env={**in_cluster, **environ})
        return str(api_client_for(config).configuration.host)

    assert host([*base, "--kubeconfig", str(flag)], {"KUBECONFIG": str(env)}) \
        == "https://flag.invalid:6443"
    assert host(base, {"KUBECONFIG": str(env)}) == "https://env.invalid:6443"
    assert host(base, {}) == "https://10.0.0.1:443"


def test_kubeconfig_list_is_merged_and_does_not_switch_auto_on(tmp_path: Path) -> None:
    first = _kubeconfig(tmp_path / "a.yaml", "https://a.invalid:6443")
    other = tmp_path / "b.yaml"
    other.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "clusters": [],
                                     "contexts": [], "users": []}))
    config = load_config(["--kubernetes", "on", "--node-name", "n"],
                         env={"KUBECONFIG": f"{other}:{first}"})
    assert api_client_for(config).configuration.host == "https://a.invalid:6443"
    auto = load_config(["--node-name", "n"], env={
        "KUBECONFIG": str(first),
        "KWATT_KUBERNETES_SERVICE_ACCOUNT_DIR": str(tmp_path / "none")})
    assert not kubernetes_enabled(auto)


def test_dashboards_import_without_editing() -> None:
    for path in sorted((REPO / "dashboards" / "grafana").glob("*.json")):
        model = yaml.safe_load(path.read_text())
        assert model["uid"] == path.stem  # stable: links and grafana.com ids rely on it
        assert "kwatt" in model["tags"]
        inputs = model["__inputs"]
        assert [(i["name"], i["type"], i["pluginId"]) for i in inputs] == [
            ("DS_PROMETHEUS", "datasource", "prometheus")]
        variable = next(v for v in model["templating"]["list"] if v["type"] == "datasource")
        assert variable["current"]["value"] == "${DS_PROMETHEUS}"
        # Every panel and target queries through the variable, never a fixed data source.
        text = path.read_text()
        uids = set(re.findall(r'"uid": "(\$\{[^"]+\})"', text))
        assert uids <= {"${datasource}"}, uids
        kinds = {r["id"] for r in model["__requires"] if r["type"] == "panel"}
        assert kinds == {p["type"] for p in model["panels"]}


def test_help_groups_flags_by_prefix_as_node_exporter_does() -> None:
    result = subprocess.run([sys.executable, "-m", "kwatt", "--help"], capture_output=True,
                            text=True, timeout=60, check=True)
    sections: dict[str, list[str]] = {}
    current = ""
    for line in result.stdout.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        for flag in re.findall(r"^  (--[\w.-]+)", line):
            sections.setdefault(current, []).append(flag)
    assert sections["web server"] == ["--web.listen-address", "--web.config.file"]
    assert sections["paths"] == ["--path.procfs", "--path.sysfs"]
    assert sections["logging"] == ["--log.level", "--log.format"]
    assert "--kubeconfig" in sections["kubernetes"]
    assert sections["general"] == ["--config", "--once", "--version"]
    assert "$KUBECONFIG" in result.stdout
