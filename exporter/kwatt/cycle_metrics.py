"""One collector for everything a sampler cycle publishes.

A scrape takes the sampler's published cycle once and renders the node/container families
and every stage's families from it, so no scrape shows one source's counters a cycle ahead
of another's (GPU energy ahead of node GPU energy, say).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from kwatt.metrics import KwattCollector, StaticInfo
from kwatt.sampler import PublishedCycle

StageRenderer = Callable[[object | None], Iterable[Metric]]


class CycleCollector(Collector):
    """``stage_renderers``: stage index (in the sampler's stage order) -> its renderer."""

    def __init__(self, published: Callable[[], PublishedCycle], info: StaticInfo,
                 stage_renderers: Mapping[int, StageRenderer]) -> None:
        self._published = published
        self._info = info
        self._stage_renderers = dict(stage_renderers)

    def collect(self) -> Iterator[Metric]:
        cycle = self._published()
        yield from KwattCollector(lambda: cycle.ledger, self._info).collect()
        for index, render in self._stage_renderers.items():
            yield from render(cycle.stages[index] if index < len(cycle.stages) else None)
