"""Top-level owners of AI workloads, through the real pod watcher and owner resolver against
the fake API server: each operator's ownerReference chain as its source builds it (see
docs/kubernetes.md for the citations), metadata-only reads, RBAC refusal, owners deleted
mid-run and ownerReference cycles."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from fake_kube_api import (
    API_VERSIONS,
    PARTIAL_OBJECT_METADATA,
    FakeKubeApi,
    make_pod,
    owner_uid,
)
from kubetest import FAST, running_watcher, wait_until
from kwatt.workloads.owners import (
    TOP,
    UNKNOWN,
    Lookup,
    ObjectRef,
    Owner,
    OwnerSource,
    resolve,
)
from simnode import pod_uid

NS = "ml"


def names(parts: object) -> dict[str, tuple[str, str, str, str]]:
    """pod -> (workload, workload_kind, owner_name, owner_kind)."""
    pods = parts.store.current().pods  # type: ignore[attr-defined]
    return {p.name: (p.workload, p.workload_kind, p.owner_name, p.owner_kind)
            for p in pods.values() if p.deleted_at is None}


def trainjob(api: FakeKubeApi, name: str = "llama-ft-0412") -> str:
    """Kubeflow Trainer: TrainJob -> JobSet (same name) -> Job <jobset>-<rjob>-<i> -> Pod."""
    api.add_owner("TrainJob", name, NS)
    api.add_owner("JobSet", name, NS, owner=("TrainJob", name, owner_uid("TrainJob", name, NS)))
    job = f"{name}-node-0"
    api.add_owner("Job", job, NS, owner=("JobSet", name, owner_uid("JobSet", name, NS)))
    return job


def jobset_labels(name: str) -> dict[str, str]:
    return {"jobset.sigs.k8s.io/jobset-name": name,
            "jobset.sigs.k8s.io/replicatedjob-name": "node"}


def test_each_operator_chain_resolves_to_the_object_its_user_created(tmp_path: Path) -> None:
    api = FakeKubeApi()
    job = trainjob(api)
    for index in range(2):
        api.add(make_pod(f"{job}-{index}-x", namespace=NS, uid=pod_uid(f"tj{index}"),
                         owner=("Job", job, owner_uid("Job", job, NS)),
                         labels=jobset_labels("llama-ft-0412")))
    # JobSet on its own.
    api.add_owner("JobSet", "sweep", NS)
    api.add_owner("Job", "sweep-workers-0", NS, owner=("JobSet", "sweep",
                                                       owner_uid("JobSet", "sweep", NS)))
    api.add(make_pod("sweep-workers-0-0-a", namespace=NS, uid=pod_uid("js"),
                     owner=("Job", "sweep-workers-0", owner_uid("Job", "sweep-workers-0", NS)),
                     labels=jobset_labels("sweep")))
    # training-operator v1: pods owned directly by the PyTorchJob / MPIJob.
    api.add_owner("PyTorchJob", "resnet", NS)
    api.add(make_pod("resnet-master-0", namespace=NS, uid=pod_uid("pt"),
                     owner=("PyTorchJob", "resnet", owner_uid("PyTorchJob", "resnet", NS))))
    api.add_owner("MPIJob", "allreduce", NS)
    api.add(make_pod("allreduce-launcher", namespace=NS, uid=pod_uid("mpi"),
                     owner=("MPIJob", "allreduce", owner_uid("MPIJob", "allreduce", NS))))
    # KubeRay: RayJob -> RayCluster -> Pod, and RayJob -> submitter Job -> Pod;
    # RayService -> RayCluster -> Pod; a RayCluster of its own.
    api.add_owner("RayJob", "tune", NS)
    rj = ("RayJob", "tune", owner_uid("RayJob", "tune", NS))
    api.add_owner("RayCluster", "tune-raycluster-k8s2x", NS, owner=rj)
    api.add_owner("Job", "tune", NS, owner=rj)
    api.add(make_pod("tune-raycluster-k8s2x-head", namespace=NS, uid=pod_uid("rayhead"),
                     owner=("RayCluster", "tune-raycluster-k8s2x",
                            owner_uid("RayCluster", "tune-raycluster-k8s2x", NS))))
    api.add(make_pod("tune-submit", namespace=NS, uid=pod_uid("raysubmit"),
                     owner=("Job", "tune", owner_uid("Job", "tune", NS))))
    api.add_owner("RayService", "chat", NS)
    api.add_owner("RayCluster", "chat-abcde", NS,
                  owner=("RayService", "chat", owner_uid("RayService", "chat", NS)))
    api.add(make_pod("chat-abcde-worker", namespace=NS, uid=pod_uid("rayserve"),
                     owner=("RayCluster", "chat-abcde", owner_uid("RayCluster", "chat-abcde",
                                                                  NS))))
    api.add_owner("RayCluster", "adhoc", NS)
    api.add(make_pod("adhoc-head", namespace=NS, uid=pod_uid("raycluster"),
                     owner=("RayCluster", "adhoc", owner_uid("RayCluster", "adhoc", NS))))
    # LeaderWorkerSet: LWS -> leader StatefulSet -> leader Pod -> worker StatefulSet ->
    # worker Pod. The leader Pod is not read (no get on pods): the LWS label names it.
    api.add_owner("LeaderWorkerSet", "vllm", NS)
    api.add_owner("StatefulSet", "vllm", NS, owner=(
        "LeaderWorkerSet", "vllm", owner_uid("LeaderWorkerSet", "vllm", NS)))
    api.add_owner("StatefulSet", "vllm-0", NS, owner=("Pod", "vllm-0", pod_uid("leader")))
    lws = {"leaderworkerset.sigs.k8s.io/name": "vllm"}
    api.add(make_pod("vllm-0", namespace=NS, uid=pod_uid("leader"), labels=lws,
                     owner=("StatefulSet", "vllm", owner_uid("StatefulSet", "vllm", NS))))
    api.add(make_pod("vllm-0-1", namespace=NS, uid=pod_uid("worker"), labels=lws,
                     owner=("StatefulSet", "vllm-0", owner_uid("StatefulSet", "vllm-0", NS))))
    # KServe serverless: ... -> Knative Revision -> Deployment -> ReplicaSet -> Pod, named by
    # the InferenceService label.
    api.add(make_pod("llama-predictor-00001-deployment-7f9-abc", namespace=NS,
                     uid=pod_uid("isvc"),
                     owner=("ReplicaSet", "llama-predictor-00001-deployment-7f9"),
                     labels={"serving.kserve.io/inferenceservice": "llama",
                             "component": "predictor", "pod-template-hash": "7f9"}))
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.store.current().synced)
        got = names(parts)
    assert got == {
        "llama-ft-0412-node-0-0-x": ("llama-ft-0412", "TrainJob", job, "Job"),
        "llama-ft-0412-node-0-1-x": ("llama-ft-0412", "TrainJob", job, "Job"),
        "sweep-workers-0-0-a": ("sweep", "JobSet", "sweep-workers-0", "Job"),
        "resnet-master-0": ("resnet", "PyTorchJob", "resnet", "PyTorchJob"),
        "allreduce-launcher": ("allreduce", "MPIJob", "allreduce", "MPIJob"),
        "tune-raycluster-k8s2x-head": ("tune", "RayJob", "tune-raycluster-k8s2x",
                                       "RayCluster"),
        "tune-submit": ("tune", "RayJob", "tune", "Job"),
        "chat-abcde-worker": ("chat", "RayService", "chat-abcde", "RayCluster"),
        "adhoc-head": ("adhoc", "RayCluster", "adhoc", "RayCluster"),
        "vllm-0": ("vllm", "LeaderWorkerSet", "vllm", "StatefulSet"),
        "vllm-0-1": ("vllm", "LeaderWorkerSet", "vllm-0", "StatefulSet"),
        "llama-predictor-00001-deployment-7f9-abc": (
            "llama", "InferenceService", "llama-predictor-00001-deployment-7f9", "ReplicaSet"),
    }
    owner_requests = api.owner_requests()
    # Every owner read is metadata-only, one GET per object (cached), never a list.
    assert owner_requests and all(PARTIAL_OBJECT_METADATA in r.accept for r in owner_requests)
    paths = [r.path for r in owner_requests]
    assert len(paths) == len(set(paths))
    assert "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/llama-ft-0412" in paths
    assert "/apis/jobset.x-k8s.io/v1alpha2/namespaces/ml/jobsets/llama-ft-0412" in paths
    assert not any(r.query.get("watch") or "/pods" in r.path for r in owner_requests)


def test_a_refused_kind_falls_back_to_labels_and_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeKubeApi()
    api.forbidden_resources = {"jobsets"}
    job = trainjob(api)
    for index in range(3):
        api.add(make_pod(f"{job}-{index}-x", namespace=NS, uid=pod_uid(f"tj{index}"),
                         owner=("Job", job, owner_uid("Job", job, NS)),
                         labels=jobset_labels("llama-ft-0412")))
    api.add_owner("RayJob", "tune", NS)
    api.add_owner("RayCluster", "tune-x", NS,
                  owner=("RayJob", "tune", owner_uid("RayJob", "tune", NS)))
    api.add(make_pod("tune-x-head", namespace=NS, uid=pod_uid("ray"),
                     owner=("RayCluster", "tune-x", owner_uid("RayCluster", "tune-x", NS))))
    settings = replace(FAST, owner_forbidden_retry_seconds=0.0, owner_cache_ttl_seconds=0.0)
    with caplog.at_level(logging.WARNING, logger="kwatt.kubernetes"), \
            running_watcher(api, tmp_path, settings=settings) as parts:
        wait_until(lambda: parts.store.current().synced)
        # Another event of the same pods: the refused kind is asked again (retry 0 s).
        api.modify(make_pod(f"{job}-0-x", namespace=NS, uid=pod_uid("tj0"),
                            owner=("Job", job, owner_uid("Job", job, NS)),
                            labels=jobset_labels("llama-ft-0412")))
        wait_until(lambda: len([r for r in api.owner_requests()
                                if "/jobsets/" in r.path]) >= 2)
        got = names(parts)
        _, faults = parts.watcher.health.drain()
    # The Job was read; its JobSet was refused: the JobSet label names the run (Trainer
    # names the JobSet after the TrainJob, so the name is the run's).
    assert got[f"{job}-0-x"] == ("llama-ft-0412", "JobSet", job, "Job")
    assert got["tune-x-head"] == ("tune", "RayJob", "tune-x", "RayCluster")
    refusals = [r for r in caplog.records if "RBAC does not allow" in r.getMessage()]
    assert [r.getMessage() for r in refusals] == [
        "RBAC does not allow get jobsets.jobset.x-k8s.io; naming their pods' workloads by "
        "labels and name rules"]
    assert {(f.reason, f.subject) for f in faults} == {("permission", "get JobSet")}


def test_a_run_keeps_its_name_when_its_trainjob_is_deleted_mid_run(tmp_path: Path) -> None:
    api = FakeKubeApi()
    job = trainjob(api)
    pod = make_pod(f"{job}-0-a", namespace=NS, uid=pod_uid("a"),
                   owner=("Job", job, owner_uid("Job", job, NS)),
                   labels=jobset_labels("llama-ft-0412"))
    api.add(pod)
    # Cache entries expire at once: every event reads the chain again.
    settings = replace(FAST, owner_cache_ttl_seconds=0.0)
    with running_watcher(api, tmp_path, settings=settings) as parts:
        wait_until(lambda: parts.store.current().synced)
        assert names(parts)[f"{job}-0-a"][:2] == ("llama-ft-0412", "TrainJob")
        # The TrainJob and its JobSet are deleted; the Job's pods wind down and one restarts.
        api.remove_owner("TrainJob", "llama-ft-0412", NS)
        api.remove_owner("JobSet", "llama-ft-0412", NS)
        before = len(api.owner_requests())
        api.add(make_pod(f"{job}-0-b", namespace=NS, uid=pod_uid("b"),
                         owner=("Job", job, owner_uid("Job", job, NS)),
                         labels=jobset_labels("llama-ft-0412")))
        wait_until(lambda: f"{job}-0-b" in names(parts))
        got = names(parts)
        after = [r.path for r in api.owner_requests()[before:]]
        # A new TrainJob of the same name (a new uid): its pods are read afresh.
        api.add_owner("TrainJob", "llama-ft-0412", NS)
    assert got[f"{job}-0-b"] == ("llama-ft-0412", "TrainJob", job, "Job")
    assert got[f"{job}-0-a"] == ("llama-ft-0412", "TrainJob", job, "Job")
    # It did ask again (and got 404s), so the name is not merely cached.
    assert any("/jobsets/" in p for p in after)


def test_an_owner_recreated_under_the_same_name_is_read_afresh(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.add_owner("RayService", "chat", NS)
    api.add_owner("RayCluster", "chat-abcde", NS,
                  owner=("RayService", "chat", owner_uid("RayService", "chat", NS)))
    api.add(make_pod("chat-abcde-head", namespace=NS, uid=pod_uid("old"),
                     owner=("RayCluster", "chat-abcde", "old-uid")))
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.store.current().synced)
        # The pod refers to a RayCluster uid that no longer exists under that name.
        assert names(parts)["chat-abcde-head"][:2] == ("chat-abcde", "RayCluster")
        api.add(make_pod("chat-abcde-worker", namespace=NS, uid=pod_uid("new"),
                         owner=("RayCluster", "chat-abcde",
                                owner_uid("RayCluster", "chat-abcde", NS))))
        wait_until(lambda: "chat-abcde-worker" in names(parts))
        got = names(parts)
    assert got["chat-abcde-worker"][:2] == ("chat", "RayService")


def test_an_owner_reference_cycle_ends_the_walk(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeKubeApi()
    api.add_owner("JobSet", "loop-a", NS,
                  owner=("TrainJob", "loop-b", owner_uid("TrainJob", "loop-b", NS)))
    api.add_owner("TrainJob", "loop-b", NS,
                  owner=("JobSet", "loop-a", owner_uid("JobSet", "loop-a", NS)))
    api.add_owner("Job", "loop-a-w-0", NS,
                  owner=("JobSet", "loop-a", owner_uid("JobSet", "loop-a", NS)))
    api.add(make_pod("loop-a-w-0-0", namespace=NS, uid=pod_uid("loop"),
                     owner=("Job", "loop-a-w-0", owner_uid("Job", "loop-a-w-0", NS))))
    api.add(make_pod("after", namespace=NS, uid=pod_uid("after")))
    with caplog.at_level(logging.WARNING, logger="kwatt.kubernetes"), \
            running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.store.current().synced)
        got = names(parts)
        lists = parts.watcher.lists
    assert lists == 1  # no failed list
    assert got["loop-a-w-0-0"][:2] == ("loop-b", "TrainJob")  # where the loop closes
    assert got["after"][:2] == ("after", "Pod")  # the watcher went on
    assert any("cycle" in r.getMessage() for r in caplog.records)
    assert len(api.owner_requests()) == 3  # each object read once


def test_owner_lookups_and_workload_bounds_are_configurable(tmp_path: Path) -> None:
    from kwatt.config import ConfigError, load_config

    path = tmp_path / "kwatt.yaml"
    path.write_text("kubernetes:\n  owner_lookups: [jobs.batch, notebooks.kubeflow.org]\n"
                    "workloads:\n  retention: 72h\n  max: 50\n")
    config = load_config(["--config", str(path)], env={})
    assert config.owner_lookups == ("jobs.batch", "notebooks.kubeflow.org")
    assert (config.workload_retention_seconds, config.max_workloads) == (72 * 3600.0, 50)
    path.write_text("kubernetes:\n  owner_lookups: [Jobs]\n")
    with pytest.raises(ConfigError, match=r"^kubernetes.owner_lookups: expected resource"):
        load_config(["--config", str(path)], env={})


class ChainSource(OwnerSource):
    """An OwnerSource over a dict: (kind, name) -> parent (kind, name) or None."""

    def __init__(self, parents: dict[tuple[str, str], tuple[str, str] | None]) -> None:
        self.parents = parents
        self.reads: list[tuple[str, str]] = []

    def parent(self, namespace: str, ref: ObjectRef) -> Lookup:
        self.reads.append((ref.kind, ref.name))
        if (ref.kind, ref.name) not in self.parents:
            return UNKNOWN
        found = self.parents[(ref.kind, ref.name)]
        if found is None:
            return TOP
        return Lookup("parent", ObjectRef(API_VERSIONS.get(found[0], "x/v1"), *found))

    def cycle(self, namespace: str, ref: ObjectRef) -> None:
        pass


def test_the_walk_stops_at_the_depth_cap() -> None:
    chain = {("Job", f"j{i}"): ("Job", f"j{i + 1}") for i in range(20)}
    source = ChainSource(dict(chain))
    pod = make_pod("p", owner=("Job", "j0"))
    got = resolve(pod, source, max_depth=8)
    assert len(source.reads) == 8
    assert (got.workload, got.owner, got.exact) == (Owner("j8", "Job"), Owner("j0", "Job"),
                                                   False)


def test_without_the_api_labels_and_name_rules_answer() -> None:
    source = OwnerSource()
    cases = {
        "trainjob": (make_pod("a", owner=("Job", "llama-node-0"),
                              labels={"jobset.sigs.k8s.io/jobset-name": "llama"}),
                     Owner("llama", "JobSet")),
        "lws worker": (make_pod("b", owner=("StatefulSet", "vllm-0"),
                                labels={"leaderworkerset.sigs.k8s.io/name": "vllm"}),
                       Owner("vllm", "LeaderWorkerSet")),
        "kserve": (make_pod("c", owner=("ReplicaSet", "m-predictor-00001-deployment-5d"),
                            labels={"serving.kserve.io/inferenceservice": "m",
                                    "pod-template-hash": "5d"}),
                   Owner("m", "InferenceService")),
        "cronjob": (make_pod("d", owner=("Job", "report-29012345")),
                    Owner("report", "CronJob")),
        "deployment": (make_pod("e", owner=("ReplicaSet", "web-5d8f"),
                                labels={"pod-template-hash": "5d8f"}),
                       Owner("web", "Deployment")),
        "bare": (make_pod("f"), Owner("f", "Pod")),
        "static": (make_pod("g", owner=("Node", "node-a")), Owner("g", "StaticPod")),
    }
    got = {case: resolve(pod, source).workload for case, (pod, _) in cases.items()}
    assert got == {case: owner for case, (_, owner) in cases.items()}
