"""A node-local dcgm-exporter stand-in over real HTTP on loopback: serves a scripted
/metrics page (the metric and label names dcgm-exporter uses for MIG instances), and can
answer with an error status, slowly, or with garbage."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def mig_page(values: dict[tuple[str, int], float]) -> str:
    """An exposition page with DCGM_FI_PROF_GR_ENGINE_ACTIVE per (GPU UUID, GPU_I_ID), plus
    a whole-GPU series and another field, as dcgm-exporter serves them."""
    lines = ["# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is "
             "active.", "# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge"]
    for n, ((uuid, gi), value) in enumerate(sorted(values.items())):
        lines.append(
            f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu="0",UUID="{uuid}",pci_bus_id='
            f'"00000000:3B:00.0",device="nvidia0",modelName="NVIDIA A100-SXM4-40GB",'
            f'GPU_I_PROFILE="{n + 3}g.20gb",GPU_I_ID="{gi}",Hostname="node"}} {value}')
    lines += ["# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).",
              "# TYPE DCGM_FI_DEV_GPU_TEMP gauge",
              'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-x",device="nvidia0"} 41']
    return "\n".join(lines) + "\n"


class FakeDcgmExporter:
    def __init__(self) -> None:
        self.body = mig_page({})
        self.status = 200
        self.delay = 0.0
        self.requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests += 1
                if fake.delay:
                    time.sleep(fake.delay)
                data = fake.body.encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeDcgmExporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Idempotent: a test may take the exporter away before the fixture ends."""
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join(5)
        self.server.server_close()
