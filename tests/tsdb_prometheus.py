"""A real Prometheus over a TSDB built by backfilling (promtool tsdb create-blocks-from),
for tests that simulate hours or days in seconds and query what Prometheus makes of it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TsdbPrometheus:
    """Serves ``tsdb`` (read-only use), optionally evaluating ``rule_file``."""

    def __init__(self, binary: str, tsdb: Path, root: Path, rule_file: Path | None) -> None:
        config = root / "prometheus.yml"
        config.write_text(yaml.safe_dump(
            {"global": {}, "rule_files": [str(rule_file)] if rule_file else []}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "prometheus.log", "a")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
             "--storage.tsdb.retention.time=30d", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                (root / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        params = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=60) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, expr: str, at: float) -> float:
        (result,) = self.query(expr, at)
        return float(result["value"][1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


class OpenMetricsRecording:
    """Scrapes of one registry at simulated times, written as timestamped OpenMetrics for
    ``promtool tsdb create-blocks-from openmetrics`` (samples grouped by family, as it
    requires)."""

    def __init__(self) -> None:
        self._meta: dict[str, list[str]] = {}
        self._points: dict[str, dict[str, list[str]]] = {}

    def add(self, exposition: str, at: float) -> None:
        family = ""
        for line in exposition.splitlines():
            if line.startswith("# EOF"):
                continue
            if line.startswith("#"):
                family = line.split()[2]
                if len(self._meta.setdefault(family, [])) < 2:
                    self._meta[family].append(line)
                continue
            series, value = line.rsplit(" ", 1)
            self._points.setdefault(family, {}).setdefault(series, []).append(
                f"{series} {value} {at:.0f}")

    def write(self, path: Path) -> None:
        with open(path, "w") as handle:
            for family, lines in self._meta.items():
                handle.write("\n".join(lines) + "\n")
                for samples in self._points.get(family, {}).values():
                    handle.write("\n".join(samples) + "\n")
            handle.write("# EOF\n")
