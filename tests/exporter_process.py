"""Run the real kwatt-exporter CLI in a subprocess and talk to it over HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from simnode import SimulatedNode

_LISTEN = re.compile(r"listen=(\S+):(\d+)")
_COUNT = re.compile(r"^kwatt_sample_duration_seconds_count\{[^}]*\} (\S+)$", re.M)


class ExporterProcess:
    def __init__(self, node: SimulatedNode, *extra: str, interval: str = "1s",
                 log_path: Path | None = None, wrapper: Sequence[str] = ()) -> None:
        """``wrapper``: a command the exporter runs under (e.g. ``unshare`` for a user
        namespace in which root cannot read files owned by an unmapped user)."""
        self.log_path = log_path or node.root.parent / "exporter.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "kwatt", "--path.sysfs", str(node.sysfs),
             "--path.procfs", str(node.procfs), "--kubernetes", "off", "--gpu", "off",
             "--interval", interval, "--web.listen-address", "127.0.0.1:0",
             "--node-name", "e2e", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited: {self.log_path.read_text()}")
            match = _LISTEN.search(self.log_path.read_text())
            if match:
                return int(match.group(2))
            time.sleep(0.05)
        raise TimeoutError(f"exporter did not start: {self.log_path.read_text()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def cycles(self) -> int:
        match = _COUNT.search(self.metrics())
        return int(float(match.group(1))) if match else 0

    def wait_for_cycle(self, after: int | None = None, timeout: float = 30.0) -> int:
        """Block until a cycle completes after the given count; return the new count."""
        start = self.cycles() if after is None else after
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count = self.cycles()
            if count > start:
                return count
            time.sleep(0.02)
        raise TimeoutError("no sampler cycle completed")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        return self.log_path.read_text()
