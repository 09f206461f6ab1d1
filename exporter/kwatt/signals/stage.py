"""Fetched grid signals as sampler stages, their fetchers per kind, and their renderers.

A ``SignalStage`` books no energy. Each sampler cycle it takes the poller's held value (in
memory) and publishes it with the cycle, together with ``kwatt_source_up`` and the faults
counted since the last cycle, so a scrape renders the gauge and the source's health from
one cycle and never waits on a fetch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any
from urllib.parse import quote

from kwatt.attribution import ComponentSplit
from kwatt.config import Config, ConfigError, SignalConfig
from kwatt.ledger import WorkloadLabels
from kwatt.sampler import StageResult
from kwatt.signals.documents import (
    CARBON_RANGE,
    PRICE_RANGE,
    SignalDocument,
    parse_document,
    parse_electricitymaps,
    parse_ukgrid,
)
from kwatt.signals.families import SignalReading
from kwatt.signals.fetch import (
    FetchError,
    HttpGet,
    get_json,
    read_document_file,
    read_secret,
    tls_context,
)
from kwatt.signals.poller import Fetch, SignalPoller
from kwatt.workloads.cgroups import CgroupIdentity

# Documented defaults (docs/carbon-and-cost.md cites where they come from).
ELECTRICITYMAPS_URL = ("https://api.electricitymap.org/v3/carbon-intensity/latest?zone={zone}"
                       "&shouldUseFallbackCallerLookup=false")
UKGRID_NATIONAL_URL = "https://api.carbonintensity.org.uk/intensity"
UKGRID_REGIONAL_URL = "https://api.carbonintensity.org.uk/regional/regionid/{zone}"


class SignalStage:
    """An ``EnergyStage`` without energy: publishes the poller's current value."""

    def __init__(self, poller: SignalPoller, currency: str = "",
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.poller = poller
        self._currency = currency
        self._wall_clock = wall_clock

    def sample(self, now: float,
               workloads: Mapping[CgroupIdentity, WorkloadLabels | None]) -> StageResult:
        up, faults = self.poller.drain()
        held = self.poller.current()
        reading = None if held is None else SignalReading(
            held.document.value_at(self._wall_clock()), held.zone, self.poller.kind,
            held.document.currency or self._currency)
        splits: tuple[ComponentSplit[Hashable], ...] = ()
        return StageResult(splits=splits, faults=tuple(faults),
                           source_up={} if up is None else {self.poller.name: up},
                           snapshot=reading)


# --------------------------------------------------------------------------- building


ZoneLookup = Callable[[], str]  # the node's zone label, read through the API; FetchError


class _Zone:
    """The zone for this node: configured, or read once from the node's label (retried on
    the poller thread until it succeeds)."""

    def __init__(self, configured: str | None, lookup: ZoneLookup | None) -> None:
        self._zone = configured
        self._lookup = lookup

    def get(self) -> str:
        if self._zone is None:
            if self._lookup is None:
                raise FetchError("absent", "no zone configured")
            self._zone = self._lookup()
        return self._zone


def _url(template: str, zone: str) -> str:
    return template.replace("{zone}", quote(zone, safe=""))


def _fetcher(prefix: str, signal: SignalConfig, zone: _Zone,
             clock: Callable[[], float]) -> Fetch:
    kind = signal.source
    if kind == "file":
        bounds = CARBON_RANGE if prefix == "carbon" else PRICE_RANGE

        def read_file() -> tuple[SignalDocument, str]:
            place = zone.get()
            return parse_document(read_document_file(signal.file), bounds,
                                  allow_currency=prefix == "cost"), place
        return read_file

    context = tls_context(signal.ca_file, f"{prefix}.ca_file")
    parse: Callable[[Any, str], SignalDocument]
    if kind == "electricitymaps":
        template = signal.url or ELECTRICITYMAPS_URL
        parse = parse_electricitymaps
    elif kind == "ukgrid":
        template = signal.url

        def parse(body: Any, place: str) -> SignalDocument:
            return parse_ukgrid(body)
    else:  # the price http kind: kwatt's own document
        template = signal.url

        def parse(body: Any, place: str) -> SignalDocument:
            return parse_document(body, PRICE_RANGE, allow_currency=True)

    def fetch() -> tuple[SignalDocument, str]:
        place = zone.get()
        url = template or (UKGRID_REGIONAL_URL if place else UKGRID_NATIONAL_URL)
        headers: dict[str, str] = {}
        if signal.token_file:
            token = read_secret(signal.token_file)
            if kind == "electricitymaps":
                headers["auth-token"] = token
            else:
                headers["Authorization"] = f"Bearer {token}"
        body = get_json(HttpGet(_url(url, place), signal.timeout_seconds, context, headers),
                        clock)
        return parse(body, place), place
    return fetch


def build_signal_stage(config: Config, prefix: str, zone_lookup: ZoneLookup | None,
                       clock: Callable[[], float] = time.monotonic,
                       wall_clock: Callable[[], float] = time.time) -> SignalStage | None:
    """The stage of ``carbon`` or ``cost`` when its source is fetched; None for static."""
    signal = config.carbon_source if prefix == "carbon" else config.price_source
    if signal.source == "static":
        return None
    configured = signal.zone_for(config.node_name)
    if configured is None and zone_lookup is None:
        raise ConfigError(f"{prefix}.zone_node_label: needs Kubernetes mode (the node object "
                          "is read through the API)")
    zone = _Zone(configured, zone_lookup)
    poller = SignalPoller("carbon" if prefix == "carbon" else "price", signal.source,
                          _fetcher(prefix, signal, zone, clock), signal.period_seconds,
                          signal.grace_seconds, clock)
    return SignalStage(poller, "" if prefix == "carbon" else config.energy_price_currency,
                       wall_clock)


def static_zone(config: Config, prefix: str) -> str:
    """The zone label of a static signal: configured zones only (no API read)."""
    signal = config.carbon_source if prefix == "carbon" else config.price_source
    return signal.zone_for(config.node_name) or ""
