"""The sketch as one fused GPU kernel (Triton): hash, sign and atomic add into the buckets, per element.

It computes the same map as :func:`gradprobe.probe.sketch.sketch_buckets` (tested against it in
Triton's interpreter on the CPU). Imported only when a CUDA tensor is sketched.
"""

from __future__ import annotations

import functools
import os

import torch

_BLOCK = 1024


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add(buf_ptr, val_ptr, n, key, offset, start, width, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        v = tl.load(val_ptr + idx, mask=mask, other=0.0)
        z = (idx + offset + 1).to(tl.uint64) * 0x9E3779B97F4A7C15 + key.to(tl.uint64)
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        b = ((z & 0xFFFFFFFF) * width.to(tl.uint64)) >> 32
        v = tl.where((z >> 63) != 0, -v, v)
        tl.atomic_add(buf_ptr + start + b.to(tl.int64), v, mask=mask)

    return add


@functools.cache
def available() -> bool:
    """Whether Triton can run here (a CUDA device, or its interpreter when ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def sketch_add(buf: torch.Tensor, values: torch.Tensor, key: int, offset: int, start: int, width: int) -> None:
    """Add the sketch of ``values`` (flat, contiguous, ``buf``'s dtype) into ``buf[start : start + width]``."""
    values = values.contiguous()
    n = values.numel()
    key = key - (1 << 64) if key >> 63 else key  # int64 bits; the kernel reads them as uint64
    grid = (triton_cdiv(n, _BLOCK),)
    _kernel()[grid](buf, values, n, key, offset, start, width, BLOCK=_BLOCK)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
