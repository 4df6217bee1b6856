"""Layer streaming: a model is walked one decoder layer at a time, and memory follows the walk.

The weights stay on the host, memory-mapped from the safetensors (transformers loads a checkpoint in its own
dtype that way: nothing is read until a tensor is touched). A walk moves the layer it works on to the device
and back when done, so the device holds one layer, its activation statistics and the calibration hidden
states (on the host too with `offload`). On a CPU-only machine the host is the device and nothing moves.

Pages of the file that a walk has read stay counted in the process's resident memory after the pruner has
replaced those weights by smaller copies; `release` gives them back, so that pruning a model holds the
pruned layers, one dense layer and the solves, not the dense model as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# share of the free device memory that the weights may take for the model to be kept there whole: the
# rest holds the hidden states, the statistics and the solves
FIT = 0.8


@dataclass(frozen=True)
class Stream:
    """How a walk places layers: on `device` one at a time (None: each stays where it is), the calibration
    hidden states on the host with `offload`."""

    device: torch.device | None = None
    offload: bool = False


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fits(bytes_needed: int, device: torch.device) -> bool:
    """Whether weights of `bytes_needed` may be kept whole on `device` (the host always takes them)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return bytes_needed <= FIT * free


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """`module` on `device` inside the block and back where it was after (None: it stays where it is)."""
    home = next(module.parameters()).device
    if device is None or device == home:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


MADV_DONTNEED = 4  # linux: drop the pages; a file mapping reads them again from the file if touched


def release(tensors: Iterable[torch.Tensor]) -> None:
    """Give back the whole pages of host memory that memory-mapped `tensors` (no longer used) occupy. Only
    file-backed memory is released: its values are read again from the file if touched, so this can never
    change a value; other memory is freed by dropping the tensor."""
    if not sys.platform.startswith("linux"):
        return
    files = _file_mappings()
    for tensor in tensors:
        start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        if tensor.device.type != "cpu" or not any(lo <= start and end <= hi for lo, hi in files):
            continue
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def _file_mappings() -> list[tuple[int, int]]:
    """[lo, hi) address ranges of this process's file mappings (an inode other than 0)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()  # lo-hi perms offset dev inode [path]
            if len(fields) >= 6 and fields[4] != "0":
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
