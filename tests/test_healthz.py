"""/healthz turns 503 when the sampler stops completing cycles."""

from __future__ import annotations

import os
import time
from pathlib import Path

from exporter_process import ExporterProcess
from simnode import SimulatedNode


def test_healthz_fails_when_a_read_hangs(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    exporter = ExporterProcess(node, interval="200ms")
    try:
        exporter.wait_for_cycle(after=0)
        status, body = exporter.get("/healthz")
        assert status == 200 and body.startswith("ok:")
        # A read that never returns (a FIFO nobody writes): the sampler blocks on it.
        stat = node.procfs / "stat"
        stat.unlink()
        os.mkfifo(stat)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, body = exporter.get("/healthz")
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503
        assert body.startswith("no sampler cycle completed in ")
        assert "limit 0.6s" in body
        assert exporter.get("/metrics")[0] == 200  # scrapes still answer from the snapshot
    finally:
        exporter.proc.kill()
        exporter.stop()
