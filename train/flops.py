"""Peak FLOP/s of a device, the denominator of MFU: dense bf16 tensor-core peaks by CUDA name."""
from __future__ import annotations

import torch

# (fragment of torch.cuda.get_device_name, dense bf16 FLOP/s); the first match wins, so the
# PCIe H100 comes before the SXM one, whose name ("NVIDIA H100 80GB HBM3") has no form factor.
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("A100", 312e12),
    ("A800", 312e12),
)


def device_peak_flops(device: torch.device | str, peak_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one `device`: `peak_tflops` x 1e12 when given (train.peak_tflops),
    else the table entry matching a CUDA device's name; None on CPU or an unlisted GPU, where MFU
    is then left out. The bf16 peak is used whatever train.precision is."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in PEAK_BF16_FLOPS if fragment in name), None)
