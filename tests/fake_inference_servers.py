"""Fake inference servers on loopback: vLLM, Hugging Face TGI, SGLang and NVIDIA Triton.

Each is a real HTTP server whose ``/metrics`` exposes the server's own metric names and
types, as listed (with the versions checked) in docs/carbon-and-cost.md:

* vLLM (V1 engine): counters ``vllm:generation_tokens_total`` and
  ``vllm:request_success_total{finished_reason}``, labelled ``model_name`` and ``engine``;
* TGI: the histogram ``tgi_request_generated_tokens`` (tokens per request: ``_sum`` is the
  tokens generated) and the counter ``tgi_request_success`` (no ``_total``);
* SGLang: the counter ``sglang:generation_tokens_total``, labelled ``model_name``;
* Triton: the counter ``nv_inference_request_success{model, version}`` (requests, no tokens).

The counters advance at a known rate from when the server started (``tokens_per_second``,
``requests_per_second``), read from an injected clock at each scrape and rounded down to
whole tokens and requests, as a server counts them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KINDS = ("vllm", "tgi", "sglang", "triton")
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass
class FakeInferenceServer:
    kind: str
    tokens_per_second: float = 0.0
    requests_per_second: float = 0.0
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    _server: ThreadingHTTPServer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown server kind {self.kind!r}")
        self.started = self.clock()

    def counts(self) -> tuple[int, int]:
        """(tokens, requests) generated so far."""
        elapsed = max(self.clock() - self.started, 0.0)
        return (math.floor(self.tokens_per_second * elapsed),
                math.floor(self.requests_per_second * elapsed))

    def exposition(self) -> str:
        tokens, requests = self.counts()
        if self.kind == "vllm":
            labels = f'engine="0",model_name="{MODEL}"'
            return (
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
                "# TYPE vllm:generation_tokens_total counter\n"
                f"vllm:generation_tokens_total{{{labels}}} {float(tokens)}\n"
                "# HELP vllm:request_success_total Count of successfully processed requests.\n"
                "# TYPE vllm:request_success_total counter\n"
                f'vllm:request_success_total{{{labels},finished_reason="stop"}} '
                f"{float(requests)}\n"
                f'vllm:request_success_total{{{labels},finished_reason="length"}} 0.0\n')
        if self.kind == "tgi":
            # Every request generates the same number of tokens here: all fall in one bucket.
            per_request = tokens / requests if requests else 0.0
            buckets = "".join(
                f'tgi_request_generated_tokens_bucket{{le="{le}"}} '
                f"{requests if per_request <= le else 0}\n"
                for le in (1.0, 10.0, 100.0, 1000.0, 10000.0))
            return (
                "# TYPE tgi_request_generated_tokens histogram\n" + buckets +
                f'tgi_request_generated_tokens_bucket{{le="+Inf"}} {requests}\n'
                f"tgi_request_generated_tokens_sum {tokens}\n"
                f"tgi_request_generated_tokens_count {requests}\n"
                "# TYPE tgi_request_success counter\n"
                f"tgi_request_success {requests}\n")
        if self.kind == "sglang":
            return (
                "# HELP sglang:generation_tokens_total Number of generation tokens processed.\n"
                "# TYPE sglang:generation_tokens_total counter\n"
                f'sglang:generation_tokens_total{{model_name="{MODEL}"}} {float(tokens)}\n')
        return (
            "# HELP nv_inference_request_success Number of successful inference requests, "
            "all batch sizes\n"
            "# TYPE nv_inference_request_success counter\n"
            f'nv_inference_request_success{{model="ensemble",version="1"}} {requests}\n')

    # -- serving ----------------------------------------------------------------------

    def start(self) -> int:
        """Serve on a free loopback port; returns the port."""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = outer.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
