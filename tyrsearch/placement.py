"""Where a model runs and in what precision: the `device` and `dtype` every command that runs a model takes.

    device  auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda, cuda:N
    dtype   auto (bfloat16 on CUDA, float32 on the CPU), bfloat16, float16, float32

The model's weights and forward passes use `dtype`; what tyrsearch accumulates or solves does not follow it
(activation statistics in float64, OBS solves in float64, KL and perplexity in float32 or better).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tyrsearch.errors import ParameterError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    def to_json(self) -> dict:
        return {"device": str(self.device), "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype))}


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for a `device` setting; a GPU that is not there is a ParameterError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ParameterError("device", f"{device!r} is unknown: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ParameterError("device", f"{device}: torch {torch.__version__} sees no CUDA GPU on this machine; use "
                                       "cpu (or auto, which picks a GPU only where there is one)")
    if index and int(index) >= torch.cuda.device_count():
        raise ParameterError("device", f"{device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                       f"numbered from 0")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a `dtype` setting on `device`."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ParameterError("dtype", f"{dtype!r} is unknown: choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """Both settings resolved, the device first (the dtype's default depends on it)."""
    resolved = resolve_device(device)
    return Placement(device=resolved, dtype=resolve_dtype(dtype, resolved))


def default_workers() -> int:
    """Evaluating workers when none are asked for: one per GPU, or one on a machine without."""
    return max(1, torch.cuda.device_count())


def placement_of(model: torch.nn.Module) -> Placement:
    """Where a loaded model's weights are and in what dtype (what result.json reports)."""
    weight = next(model.parameters())
    return Placement(device=weight.device, dtype=weight.dtype)

