"""The device's math settings for a run: deterministic algorithms, cuDNN autotuning, TF32.

They are process-wide torch switches, set once before the model is built (by the run, and by
`bench compare`, so a measurement and a run use the same kernels):

- `run.deterministic` (or `--debug`): torch.use_deterministic_algorithms; on CUDA only a
  warning for an op without a deterministic kernel, and cuBLAS gets the fixed workspace it needs
  to be deterministic (CUBLAS_WORKSPACE_CONFIG, unless already set). cuDNN autotuning is off
  then: it picks algorithms by timing, so two runs (or a run and its resume) may use different ones.
- `train.cudnn_benchmark`: cuDNN times its convolution algorithms for each new input shape and
  keeps the fastest (the first steps of each shape are slower).
- `train.tf32`: float32 matmuls and cuDNN convolutions on TF32 tensor cores (10-bit mantissa)
  or in full float32; null keeps torch's defaults (TF32 for convolutions, not for matmuls).
  Under `train.amp=bf16/fp16` it only concerns the ops autocast leaves in float32.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def set_tf32(enabled: bool) -> None:
    """TF32 (True) or full float32 (False) for CUDA matmuls and cuDNN convolutions."""
    precision = "tf32" if enabled else "ieee"
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(cudnn_conv, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision  # torch >= 2.9: the legacy flags are deprecated
        cudnn_conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_state() -> dict:
    """What the TF32 switches say now: {"matmul": bool, "conv": bool}."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(cudnn_conv, "fp32_precision"):
        # "none" defers to the global torch.backends.fp32_precision, whose default is "ieee"... except that
        # torch.set_float32_matmul_precision("high") also means TF32 for matmuls
        matmul = (
            torch.backends.cuda.matmul.fp32_precision == "tf32" or torch.get_float32_matmul_precision() != "highest"
        )
        return {"matmul": matmul, "conv": cudnn_conv.fp32_precision == "tf32"}
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "conv": torch.backends.cudnn.allow_tf32}


def configure(cudnn_benchmark: bool, tf32: Optional[bool], deterministic: bool, device: torch.device) -> dict:
    """Set the process's switches for a run on `device`; returns what was set (for records)."""
    if deterministic:
        if device.type == "cuda":
            # read when cuBLAS starts: before the first matmul
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark) and not deterministic
    if tf32 is not None:
        set_tf32(tf32)
    return {"deterministic": deterministic, "cudnn_benchmark": torch.backends.cudnn.benchmark, "tf32": tf32_state()}
