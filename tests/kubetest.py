"""Shared pieces of the Kubernetes tests: a running fake API and a watcher against it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fake_kube_api import FakeKubeApi, write_kubeconfig
from kwatt.config import Config, load_config
from kwatt.workloads.kubernetes import KubernetesParts, build_kubernetes
from kwatt.workloads.podwatch import WatchSettings

NODE = "node-a"

# Small timeouts so a test sees backoff, hangs and reconnects within seconds.
FAST = WatchSettings(
    watch_timeout_min_seconds=20, watch_timeout_max_seconds=20, connect_timeout_seconds=1.0,
    read_timeout_seconds=2.0, list_timeout_seconds=2.0, owner_timeout_seconds=1.0,
    backoff_initial_seconds=0.05, backoff_max_seconds=0.2, max_attempts_per_window=40,
    attempt_window_seconds=1.0, healthy_after_seconds=0.5)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def kube_config(kubeconfig: Path, *extra: str, sysfs: str = "/nonexistent",
                procfs: str = "/nonexistent") -> Config:
    return load_config(["--kubernetes", "on", "--node-name", NODE, "--kubeconfig",
                        str(kubeconfig), "--gpu", "off", "--path.sysfs", sysfs,
                        "--path.procfs", procfs, *extra], env={})


@contextmanager
def running_watcher(api: FakeKubeApi, tmp_path: Path, *extra: str,
                    settings: WatchSettings = FAST, clock: Callable[[], float] = time.monotonic,
                    config: Config | None = None) -> Iterator[KubernetesParts]:
    """Serve ``api``, build the Kubernetes parts against it and run the watcher thread."""
    with api.serve() as url:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
        cfg = config or kube_config(kubeconfig, *extra)
        if config is not None:
            from dataclasses import replace
            cfg = replace(config, kubeconfig=str(kubeconfig))
        parts = build_kubernetes(cfg, clock=clock, settings=settings)
        parts.watcher.start()
        try:
            yield parts
        finally:
            parts.watcher.stop()
            api.close_watches()
            parts.watcher.join(5)
            assert not parts.watcher._thread or not parts.watcher._thread.is_alive()
