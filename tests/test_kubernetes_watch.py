"""The pod watcher against a local HTTP server speaking the Kubernetes list/watch protocol,
driven by the real ``kubernetes`` client through a kubeconfig."""

from __future__ import annotations

import time
from pathlib import Path

from fake_kube_api import FakeKubeApi, make_pod
from kubetest import FAST, NODE, running_watcher, wait_until
from kwatt.ledger import WorkloadLabels
from kwatt.workloads.cgroups import CgroupIdentity
from kwatt.workloads.podwatch import WatchSettings
from simnode import container_id, pod_uid


def cid(seed: str) -> str:
    return container_id(seed)


def containerd(seed: str) -> str:
    return "containerd://" + cid(seed)


def ident(uid: str, seed: str) -> CgroupIdentity:
    return CgroupIdentity("container", pod_uid=uid, container_id=cid(seed),
                          runtime="containerd", qos="burstable")


def test_list_then_watch_only_this_node(tmp_path: Path) -> None:
    api = FakeKubeApi()
    here = make_pod("web-1", uid=pod_uid("web-1"), containers={"web": containerd("web-1")})
    there = make_pod("other", uid=pod_uid("other"), node="node-b",
                     containers={"c": containerd("other")})
    api.add(here)
    api.add(there)
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.store.current().synced, what="first list")
        index = parts.store.current()
        assert set(index.pods) == {pod_uid("web-1")}
        assert parts.namer.name(ident(pod_uid("web-1"), "web-1")) == \
            WorkloadLabels("default", "web-1", "web", "web-1", "Pod")

        late = make_pod("web-2", uid=pod_uid("web-2"), containers={"web": containerd("web-2")})
        api.add(late)
        wait_until(lambda: pod_uid("web-2") in parts.store.current().pods, what="ADDED")
        api.delete(late)
        wait_until(lambda: parts.store.current().pods[pod_uid("web-2")].deleted_at is not None,
                   what="DELETED")
        # A deleted pod stays as a tombstone so late cgroups are still named.
        assert parts.namer.name(ident(pod_uid("web-2"), "web-2")) is not None
        assert parts.watcher.lists == 1

    pod_requests = api.pod_requests()
    assert pod_requests, "no request reached the server"
    for request in pod_requests:
        assert request.path == "/api/v1/pods"
        assert request.query.get("fieldSelector") == f"spec.nodeName={NODE}"
    watches = [r for r in pod_requests if r.query.get("watch") == "true"]
    assert watches and all(r.query.get("allowWatchBookmarks") == "true" for r in watches)
    assert all(r.query.get("resourceVersion") for r in watches)
    assert all(r.query.get("timeoutSeconds") == "20" for r in watches)


def test_bookmark_moves_the_resource_version_a_reconnect_resumes_from(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.add(make_pod("a", uid=pod_uid("a")))
    with running_watcher(api, tmp_path) as parts:
        # The server's stream must be open, or the bookmark is sent to no one.
        wait_until(lambda: api.watching >= 1 and parts.store.current().synced)
        api.bookmark()
        bookmark_rv = str(api.rv)
        wait_until(lambda: parts.watcher.resource_version == bookmark_rv, what="bookmark")
        api.close_watches()  # the server ends the stream, as at timeoutSeconds
        wait_until(lambda: any(r.query.get("resourceVersion") == bookmark_rv
                               and r.query.get("watch") == "true"
                               for r in api.pod_requests()), what="resumed watch")
        assert parts.watcher.lists == 1  # resumed, not relisted
        up, faults = parts.watcher.health.drain()
        assert up and faults == []


def _gone_relists(tmp_path: Path, as_http: bool) -> None:
    api = FakeKubeApi()
    api.gone_as_http = as_http
    first = make_pod("first", uid=pod_uid("first"), containers={"c": containerd("first")})
    api.add(first)
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.watcher.watches >= 1 and parts.store.current().synced)
        # While history is compacted away, "first" is deleted and "second" created; the
        # watch from the old resourceVersion gets 410 and the watcher must list again.
        with api.cond:
            api.pods.pop(pod_uid("first"))
        second = make_pod("second", uid=pod_uid("second"))
        with api.cond:
            stamped = api._stamp(second)
            api.pods[pod_uid("second")] = stamped
        api.compact()
        wait_until(lambda: parts.watcher.lists == 2, what="relist after 410")
        wait_until(lambda: pod_uid("second") in parts.store.current().pods)
        index = parts.store.current()
        assert index.pods[pod_uid("first")].deleted_at is not None
        assert index.pods[pod_uid("second")].deleted_at is None
        api.add(make_pod("third", uid=pod_uid("third")))
        wait_until(lambda: pod_uid("third") in parts.store.current().pods, what="watch resumed")
        up, faults = parts.watcher.health.drain()
        assert up
        assert faults == []  # 410 is protocol, not an error


def test_gone_as_error_event_relists(tmp_path: Path) -> None:
    _gone_relists(tmp_path, as_http=False)


def test_gone_as_http_status_relists(tmp_path: Path) -> None:
    _gone_relists(tmp_path, as_http=True)


def test_500s_keep_the_last_mapping_back_off_and_recover(tmp_path: Path) -> None:
    api = FakeKubeApi()
    pod = make_pod("db-0", uid=pod_uid("db-0"), containers={"db": containerd("db-0")},
                   owner=("StatefulSet", "db"))
    api.add(pod)
    settings = WatchSettings(**{**FAST.__dict__, "max_attempts_per_window": 5,
                                "attempt_window_seconds": 1.0})
    with running_watcher(api, tmp_path, settings=settings) as parts:
        wait_until(lambda: parts.watcher.watches >= 1 and parts.store.current().synced)
        assert parts.watcher.health.drain()[0]
        before = len(api.pod_requests())
        api.set_failure(500)
        started = time.monotonic()
        wait_until(lambda: not parts.watcher.health.drain()[0] or False, what="down")
        time.sleep(2.0)
        elapsed = time.monotonic() - started
        up, faults = parts.watcher.health.drain()
        assert faults and all(f.reason == "api" for f in faults)
        assert not up
        failed = len(api.pod_requests()) - before
        # Bounded: at most 5 requests per 1 s window, whatever the backoff says.
        assert 2 <= failed <= 5 * (elapsed + 1), failed
        # The last mapping stays in use while the API is down.
        assert parts.namer.name(ident(pod_uid("db-0"), "db-0")) == \
            WorkloadLabels("default", "db-0", "db", "db", "StatefulSet")

        api.set_failure(None)
        wait_until(lambda: parts.watcher.health.drain()[0], what="up again")
        api.add(make_pod("db-1", uid=pod_uid("db-1")))
        wait_until(lambda: pod_uid("db-1") in parts.store.current().pods)

    assert parts.watcher.lists == 1  # the outage did not invalidate the resourceVersion


def test_faults_are_counted_with_reasons(tmp_path: Path) -> None:
    api = FakeKubeApi()
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.store.current().synced)
        api.set_failure(500)
        collected = []
        wait_until(lambda: collected.extend(parts.watcher.health.drain()[1]) or collected)
        assert {(f.source, f.reason) for f in collected} == {("kubernetes", "api")}
        api.set_failure(403)
        collected.clear()
        wait_until(lambda: any(f.reason == "permission" for f in
                               collected.extend(parts.watcher.health.drain()[1]) or collected))
        api.set_failure(None)


def test_hung_watch_is_detected_by_the_read_timeout(tmp_path: Path) -> None:
    api = FakeKubeApi()
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.watcher.watches >= 1 and parts.store.current().synced)
        with api.cond:
            api.hang_watch = True  # headers, then silence
        api.close_watches()
        api.add(make_pod("unseen", uid=pod_uid("unseen")))
        faults: list = []
        wait_until(lambda: faults.extend(parts.watcher.health.drain()[1]) or faults,
                   timeout=FAST.read_timeout_seconds * 3, what="timeout fault")
        assert [f.reason for f in faults] == ["timeout"]
        assert pod_uid("unseen") not in parts.store.current().pods
        with api.cond:
            api.hang_watch = False
        wait_until(lambda: pod_uid("unseen") in parts.store.current().pods,
                   timeout=FAST.read_timeout_seconds * 3, what="recovery after hang")


def test_hung_list_is_detected(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.add(make_pod("p", uid=pod_uid("p")))
    api.hang = True  # before the first list: nothing answers at all
    with running_watcher(api, tmp_path) as parts:
        faults: list = []
        wait_until(lambda: faults.extend(parts.watcher.health.drain()[1]) or faults,
                   timeout=FAST.list_timeout_seconds * 3, what="timeout fault")
        assert faults[0].reason == "timeout"
        assert not parts.store.current().synced
        api.set_failure(None)
        wait_until(lambda: parts.store.current().synced, timeout=10)
        assert pod_uid("p") in parts.store.current().pods


def test_owner_lookups_find_deployment_and_cronjob_and_are_cached(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.replicasets[("shop", "cart-7d9f8b6c5")] = {
        "kind": "ReplicaSet", "metadata": {"name": "cart-7d9f8b6c5", "namespace": "shop",
                                           "ownerReferences": [{"kind": "Deployment",
                                                                "name": "cart",
                                                                "controller": True}]}}
    api.jobs[("batch", "report-29012345")] = {
        "kind": "Job", "metadata": {"name": "report-29012345", "namespace": "batch",
                                    "ownerReferences": [{"kind": "CronJob",
                                                         "name": "report",
                                                         "controller": True}]}}
    api.jobs[("batch", "migrate")] = {"kind": "Job", "metadata": {"name": "migrate"}}
    # Owners whose names break the name rules: only the lookup can get these right.
    api.replicasets[("shop", "checkout-v2")] = {
        "kind": "ReplicaSet", "metadata": {"name": "checkout-v2", "ownerReferences": [
            {"kind": "Deployment", "name": "checkout", "controller": True}]}}
    api.jobs[("batch", "nightly-manual")] = {
        "kind": "Job", "metadata": {"name": "nightly-manual", "ownerReferences": [
            {"kind": "CronJob", "name": "nightly", "controller": True}]}}
    api.add(make_pod("checkout-v2-abc", namespace="shop", uid=pod_uid("checkout"),
                     owner=("ReplicaSet", "checkout-v2"), labels={"pod-template-hash": "x1"}))
    api.add(make_pod("nightly-manual-abc", namespace="batch", uid=pod_uid("nightly"),
                     owner=("Job", "nightly-manual")))
    for index in range(2):
        api.add(make_pod(f"cart-7d9f8b6c5-x{index}", namespace="shop",
                         uid=pod_uid(f"cart{index}"), owner=("ReplicaSet", "cart-7d9f8b6c5"),
                         labels={"pod-template-hash": "7d9f8b6c5"}))
    api.add(make_pod("report-29012345-abcde", namespace="batch", uid=pod_uid("report"),
                     owner=("Job", "report-29012345")))
    api.add(make_pod("migrate-xyz", namespace="batch", uid=pod_uid("migrate"),
                     owner=("Job", "migrate")))
    api.add(make_pod("fluentd-abc", namespace="kube-system", uid=pod_uid("ds"),
                     owner=("DaemonSet", "fluentd")))
    api.add(make_pod("static-node-a", namespace="kube-system", uid=pod_uid("static"),
                     owner=("Node", NODE)))
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.store.current().synced)
        pods = parts.store.current().pods
        got = {p.name: (p.workload, p.workload_kind) for p in pods.values()}
    assert got == {
        "cart-7d9f8b6c5-x0": ("cart", "Deployment"),
        "cart-7d9f8b6c5-x1": ("cart", "Deployment"),
        "report-29012345-abcde": ("report", "CronJob"),
        "migrate-xyz": ("migrate", "Job"),
        "fluentd-abc": ("fluentd", "DaemonSet"),
        "static-node-a": ("static-node-a", "StaticPod"),
        "checkout-v2-abc": ("checkout", "Deployment"),
        "nightly-manual-abc": ("nightly", "CronJob"),
    }
    owner_requests = [r.path for r in api.requests if r.path.startswith("/apis/")]
    assert sorted(owner_requests) == [
        "/apis/apps/v1/namespaces/shop/replicasets/cart-7d9f8b6c5",
        "/apis/apps/v1/namespaces/shop/replicasets/checkout-v2",
        "/apis/batch/v1/namespaces/batch/jobs/migrate",
        "/apis/batch/v1/namespaces/batch/jobs/nightly-manual",
        "/apis/batch/v1/namespaces/batch/jobs/report-29012345",
    ]  # one GET per owner, cached; never a list


def test_forbidden_owner_lookups_fall_back_to_name_rules(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.forbid_owners = True
    api.add(make_pod("cart-7d9f8b6c5-x0", namespace="shop", uid=pod_uid("cart"),
                     owner=("ReplicaSet", "cart-7d9f8b6c5"),
                     labels={"pod-template-hash": "7d9f8b6c5"}))
    api.add(make_pod("plain-rs-abc", namespace="shop", uid=pod_uid("plain"),
                     owner=("ReplicaSet", "plain-rs")))
    api.add(make_pod("report-29012345-abcde", namespace="batch", uid=pod_uid("report"),
                     owner=("Job", "report-29012345")))
    api.add(make_pod("migrate-xyz", namespace="batch", uid=pod_uid("migrate"),
                     owner=("Job", "migrate")))
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.store.current().synced)
        got = {p.name: (p.workload, p.workload_kind)
               for p in parts.store.current().pods.values()}
        _, faults = parts.watcher.health.drain()
    assert got == {
        "cart-7d9f8b6c5-x0": ("cart", "Deployment"),
        "plain-rs-abc": ("plain-rs", "ReplicaSet"),
        "report-29012345-abcde": ("report", "CronJob"),
        "migrate-xyz": ("migrate", "Job"),
    }
    # One 403 per kind, then no more lookups of that kind for a while.
    assert sorted(f.subject for f in faults) == ["get Job", "get ReplicaSet"]
    assert len([r for r in api.requests if r.path.startswith("/apis/")]) == 2


def test_failing_owner_lookups_pause_instead_of_one_request_per_pod(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.owner_fail_status = 503
    for index in range(20):
        api.add(make_pod(f"svc{index}-5d8f7c-x", namespace="shop", uid=pod_uid(f"s{index}"),
                         owner=("ReplicaSet", f"svc{index}-5d8f7c"),
                         labels={"pod-template-hash": "5d8f7c"}))
    with running_watcher(api, tmp_path) as parts:
        wait_until(lambda: parts.store.current().synced)
        kinds = {(p.workload, p.workload_kind) for p in parts.store.current().pods.values()}
        _, faults = parts.watcher.health.drain()
    assert kinds == {(f"svc{i}", "Deployment") for i in range(20)}  # name rule meanwhile
    assert len([r for r in api.requests if r.path.startswith("/apis/")]) == 1
    assert [(f.reason, f.subject) for f in faults] == [("api", "get ReplicaSet")]


def test_health_is_up_only_while_a_watch_is_open_or_within_the_grace() -> None:
    from conftest import FakeClock
    from kwatt.workloads.podwatch import WatchHealth

    clock = FakeClock()
    health = WatchHealth(grace_seconds=10.0, clock=clock)
    assert not health.up  # nothing answered yet
    health.answered()  # the list
    assert health.up
    clock.advance(11.0)
    assert not health.up  # listed, but no watch followed
    health.watch_opened()
    clock.advance(3600.0)
    assert health.up  # a quiet, open watch is fine however long
    health.watch_closed()
    clock.advance(9.0)
    assert health.up  # reconnecting
    clock.advance(2.0)
    assert not health.up  # no watch for longer than the grace
    health.watch_opened()
    assert health.up
    health.failed()
    assert not health.up  # a failed request is down at once, grace or not
    health.answered()
    assert health.drain() == (True, [])
