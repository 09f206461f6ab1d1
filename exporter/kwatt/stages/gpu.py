"""The GPU stage, under the stages package; it lives in kwatt.gpu_stage."""

from kwatt.gpu_stage import GpuStage, GpuUnavailable, build_gpu_stage

__all__ = ["GpuStage", "GpuUnavailable", "build_gpu_stage"]
