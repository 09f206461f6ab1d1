"""Readers of hardware energy: RAPL powercap, NVML and the estimation model."""
