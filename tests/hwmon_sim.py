"""Install the hwmon fixture trees (tests/fixtures/hwmon) into a simulated node."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from simnode import SimulatedNode

FIXTURES = Path(__file__).parent / "fixtures" / "hwmon"


def install_hwmon(node: SimulatedNode, tree: str) -> None:
    shutil.copytree(FIXTURES / tree, node.sysfs, dirs_exist_ok=True)


def set_hwmon(node: SimulatedNode, relative: str, value: int) -> None:
    """Write one attribute (relative to <sysfs>/class/hwmon) as the kernel would: whole."""
    path = node.sysfs / "class" / "hwmon" / relative
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{value}\n")
    os.replace(temporary, path)
