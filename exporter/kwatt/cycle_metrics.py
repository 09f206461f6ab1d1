"""One collector for everything a sampler cycle publishes.

A scrape takes the sampler's published cycle once and renders the node/container families
and every stage's families from it, so no scrape shows one source's counters a cycle ahead
of another's (GPU energy ahead of node GPU energy, say).

A published cycle never changes, so its exposition is rendered once per format and reused
by every scrape of that cycle (``exposition``); ``collect`` stays for registries.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from kwatt.exposition import ExpositionRenderer
from kwatt.metrics import KwattCollector, StaticInfo
from kwatt.sampler import PublishedCycle

StageRenderer = Callable[[object | None], Iterable[Metric]]

# zlib level 1: a 150 KiB exposition compresses to 14.6 KiB in 0.36 ms here, against
# 12.8 KiB in 0.82 ms at level 6 (prometheus_client uses 9): the CPU matters more.
GZIP_LEVEL = 1


class CycleCollector(Collector):
    """``stage_renderers``: stage index (in the sampler's stage order) -> its renderer."""

    def __init__(self, published: Callable[[], PublishedCycle], info: StaticInfo,
                 stage_renderers: Mapping[int, StageRenderer]) -> None:
        self._published = published
        self._info = info
        self._stage_renderers = dict(stage_renderers)
        self._lock = threading.Lock()
        self._renderer = ExpositionRenderer()
        self._cycle: PublishedCycle | None = None
        self._bodies: dict[tuple[bool, bool], bytes] = {}
        self.renders = 0  # cycles rendered, for tests and the benchmark

    def collect(self) -> Iterator[Metric]:
        return self._families(self._published())

    def _families(self, cycle: PublishedCycle) -> Iterator[Metric]:
        yield from KwattCollector(lambda: cycle.ledger, self._info).collect()
        for index, render in self._stage_renderers.items():
            yield from render(cycle.stages[index] if index < len(cycle.stages) else None)

    def exposition(self, openmetrics: bool, gzipped: bool) -> bytes:
        """The families of the published cycle in the text format (OpenMetrics without its
        ``# EOF``), gzipped as one gzip member when asked; rendered once per cycle."""
        cycle = self._published()
        with self._lock:
            if cycle is not self._cycle:
                self._cycle = cycle
                self._bodies = {}
            body = self._bodies.get((openmetrics, gzipped))
            if body is None:
                plain = self._bodies.get((openmetrics, False))
                if plain is None:
                    self.renders += 1
                    plain = self._renderer.render(self._families(cycle), openmetrics)
                    self._bodies[(openmetrics, False)] = plain
                body = gzip.compress(plain, GZIP_LEVEL, mtime=0) if gzipped else plain
                self._bodies[(openmetrics, gzipped)] = body
            return body
