"""The README's example config is a config the exporter accepts, key for key."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO
from kwatt.config import load_config


def test_readme_config_example_loads(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    example = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert example is not None
    path = tmp_path / "kwatt.yaml"
    path.write_text(example.group(1))
    config = load_config(["--config", str(path)], env={"NODE_NAME": "n1"})
    assert config.interval_seconds == 5.0
    assert config.carbon_intensity_grams_per_kwh == 350
    assert config.energy_price_currency == "EUR"
    assert (config.embodied_kg_co2e, config.embodied_lifetime_years) == (1500, 4)
    assert config.attribution.idle_watts_cpu == 42.0
    assert config.pod_label_allowlist == ("team", "app.kubernetes.io/name")
    assert config.service_account_dir == "/var/run/secrets/kubernetes.io/serviceaccount"


def test_every_flag_is_in_the_readme_flag_table() -> None:
    from kwatt.config import build_arg_parser

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Chart values")]
    documented = set(re.findall(r"`(--[a-z][\w.-]*)", table))
    flags = {option for action in build_arg_parser()._actions
             for option in action.option_strings if option.startswith("--")} - {"--help"}
    assert flags - documented == set()
