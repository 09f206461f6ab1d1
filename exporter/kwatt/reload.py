"""What a SIGHUP reload may change while running, and what needs a restart.

Settings that only label or scale what is exposed (carbon, price, PUE), the log settings
and the web config take effect on reload. Everything the sampler, sources and watch were
built from (paths, interval, Kubernetes, GPU, attribution, the listen address) needs a
restart: a reload names those keys in one log line and keeps their running values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kwatt.config import FILE_ONLY, SETTINGS, Config

LIVE_SETTINGS = frozenset({
    "web_config_file", "log_level", "log_format", "carbon_intensity_grams_per_kwh",
    "energy_price_per_kwh", "energy_price_currency", "pue", "embodied_kg_co2e",
    "embodied_lifetime_years",
})

# Config field (dotted for nested ones) -> the name a user writes in the YAML file.
_KEY_NAMES: dict[str, str] = {s.dest: s.yaml_path for s in SETTINGS}
_KEY_NAMES.update({dest: path for path, (dest, _) in FILE_ONLY.items()})


def _flat(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            for inner in dataclasses.fields(value):
                out[f"{field.name}.{inner.name}"] = getattr(value, inner.name)
        else:
            out[field.name] = value
    return out


def changed_settings(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(changed keys applied live, changed keys that need a restart), as YAML key names."""
    before, after = _flat(old), _flat(new)
    live: list[str] = []
    restart: list[str] = []
    for dest in before:
        if before[dest] != after[dest]:
            name = _KEY_NAMES.get(dest, dest)
            (live if dest in LIVE_SETTINGS else restart).append(name)
    return sorted(live), sorted(restart)
