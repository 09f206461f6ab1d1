from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kwatt.config import Config, load_config
from simnode import SimulatedNode

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


def require_tool(name: str) -> str:
    """Path of an external tool. A missing tool fails the test, never skips it:
    scripts/install-test-tools installs every one of them."""
    found = shutil.which(name) or (
        str(REPO / ".tools" / "bin" / name) if (REPO / ".tools" / "bin" / name).exists()
        else None)
    if not found:
        pytest.fail(f"{name} not found: run scripts/install-test-tools")
    return found


def node_config(node: SimulatedNode, *extra: str, env: dict[str, str] | None = None) -> Config:
    return load_config(["--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
                        "--kubernetes", "off", "--gpu", "off", "--node-name", "sim", *extra],
                       env=env or {})


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(tmp_path: Path) -> Callable[..., SimulatedNode]:
    def make(**kwargs: Any) -> SimulatedNode:
        return SimulatedNode(tmp_path / "node", **kwargs)
    return make
