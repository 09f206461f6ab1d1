"""Host-mode names: systemd units, Docker names from Docker's own state, short ids."""

from __future__ import annotations

import json
from pathlib import Path

from kwatt.ledger import WorkloadLabels
from kwatt.workloads.cgroups import CgroupIdentity
from kwatt.workloads.naming import HostNamer
from simnode import container_id


def test_docker_container_named_from_config_v2(tmp_path: Path) -> None:
    named, unnamed, garbled = container_id("a"), container_id("b"), container_id("c")
    (tmp_path / "containers" / named).mkdir(parents=True)
    (tmp_path / "containers" / named / "config.v2.json").write_text(
        json.dumps({"ID": named, "Name": "/shop-db-1"}))
    (tmp_path / "containers" / garbled).mkdir(parents=True)
    (tmp_path / "containers" / garbled / "config.v2.json").write_text("{not json")
    namer = HostNamer(str(tmp_path))
    assert namer.name(CgroupIdentity("docker", container_id=named, runtime="docker")) == \
        WorkloadLabels("", "", "shop-db-1", "shop-db-1", "docker")
    for cid in (unnamed, garbled):
        assert namer.name(CgroupIdentity("docker", container_id=cid, runtime="docker")) == \
            WorkloadLabels("", "", cid[:12], cid[:12], "docker")


def test_other_host_kinds() -> None:
    namer = HostNamer()
    cid = container_id("x")
    assert namer.name(CgroupIdentity("service", name="sshd.service")) == \
        WorkloadLabels("", "", "sshd.service", "sshd.service", "systemd")
    assert namer.name(CgroupIdentity("podman", container_id=cid)) == \
        WorkloadLabels("", "", cid[:12], cid[:12], "podman")
    assert namer.name(CgroupIdentity("pod", pod_uid="u-1")) == \
        WorkloadLabels("", "u-1", "POD", "", "")
