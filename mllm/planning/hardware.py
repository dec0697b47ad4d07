"""GPU presets: the bf16 dense tensor-core peak a plan's MFU is a share of, and the memory a plan must fit.

Peaks are NVIDIA's datasheet figures for dense bf16 (the datasheets print the 2:4-sparsity figure, twice
these): A100 SXM 312 TFLOPS (624 sparse); H100 SXM5 989.4 TFLOPS (1,979 sparse); H200 SXM the same
silicon as H100 SXM at the same clocks, 989.4 TFLOPS, with 141 GB of HBM3e. Memory is the nominal size
the product is named by, compared with estimates in GiB (2^30 bytes, as DeepSpeed's estimators print):
the CUDA context (~0.5-1 GiB) and allocator fragmentation are not in the estimate, so keep headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

from encoders.registry import Registry

__all__ = ["GPUS", "GpuPreset", "register_gpu"]


@dataclass(frozen=True)
class GpuPreset:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak, 10^12 FLOP/s
    memory_gb: float  # nominal memory per GPU
    source: str


GPUS: Registry[GpuPreset] = Registry("GPU preset")


def register_gpu(preset: GpuPreset) -> GpuPreset:
    """Add a preset under its name (`--gpu NAME`)."""
    return GPUS.register(preset.name, preset, stacklevel=2)


register_gpu(GpuPreset("h100", 989.4, 80, "NVIDIA H100 SXM5 80GB datasheet: BF16 1,979 TFLOPS with sparsity"))
register_gpu(
    GpuPreset("h200", 989.4, 141, "NVIDIA H200 SXM 141GB datasheet: BF16 1,979 TFLOPS with sparsity")
)
register_gpu(GpuPreset("a100", 312.0, 80, "NVIDIA A100 SXM 80GB datasheet: BF16 312 TFLOPS (624 sparse)"))
register_gpu(
    GpuPreset("a100-40gb", 312.0, 40, "NVIDIA A100 SXM 40GB datasheet: BF16 312 TFLOPS (624 sparse)")
)
