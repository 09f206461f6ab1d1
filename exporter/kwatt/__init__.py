"""kwatt: attribute node energy (RAPL, NVML or an estimation model) to workloads."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kwatt")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"
