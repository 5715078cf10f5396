"""Reference store: rows of gradient-shaped vectors kept per parameter.

A store holds ``rows`` vectors with the shape of the selected parameters, one
``(rows, numel)`` tensor per parameter, so a backward hook can dot a parameter's
gradient with every row in one matrix-vector product without any flattened copy
of the whole gradient.

Where it lives and in what dtype is the user's choice (``device`` / ``dtype``):

* ``device="model"`` keeps each parameter's rows on that parameter's device. On a
  GPU this is fastest (the dot reads the reference at memory bandwidth) and costs
  ``rows × numel × itemsize`` bytes of GPU memory; for a 7B model one bf16 row
  is about 15.5 GiB.
* ``device="cpu"`` keeps rows in host memory, pinned when CUDA is available so the
  per-parameter copy to the GPU is asynchronous. It costs no GPU memory, but each
  backward moves ``rows × numel × itemsize`` bytes over PCIe (about 0.6 s per
  15.5 GiB row at 25 GB/s) and the copy lands in a transient GPU buffer the size
  of one parameter's rows.
* ``dtype`` float32 (default for float32/bf16/fp16 models) keeps sums exact to
  fp32; bfloat16 halves memory at about three significant digits per element,
  which shifts dot products by a relative error of order 1e-3; float64 is used for
  float64 models so that brute-force comparisons hold to 1e-10.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradprobe.errors import InputError
from gradprobe.probe.shard import local
from gradprobe.probe.sketch import SketchSpec

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_reference_device(device: str) -> str:
    """``model`` (the reference rows live on each parameter's device) or ``cpu``.

    Raises:
        InputError: anything else.
    """
    if device not in ("model", "cpu"):
        raise InputError(f"reference_device: expected 'model' or 'cpu', got {device!r}")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype, option: str = "dtype") -> torch.dtype:
    """Turn a dtype name into a torch dtype (None → ``default``); errors name ``option``."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"{option}: {dtype} is not a floating-point dtype")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise InputError(f"{option}: unknown dtype {dtype!r}; use one of float32, float64, bfloat16, float16")
    return _DTYPES[key]


class ReferenceStore:
    """``rows`` gradient-shaped vectors over a list of parameters.

    Args:
        params: the parameters (their shapes and devices).
        rows: how many vectors.
        dtype: storage dtype.
        device: ``"model"`` (each parameter's own device) or ``"cpu"`` (pinned when CUDA is available).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        rows: int,
        dtype: torch.dtype,
        device: str = "model",
    ) -> None:
        check_reference_device(device)
        self.rows = rows
        self.dtype = dtype
        self.device = device
        pin = device == "cpu" and torch.cuda.is_available()
        self.tensors: list[torch.Tensor] = []
        for p in params:
            piece = local(p)  # this rank's piece of a sharded (FSDP2) parameter
            dev = piece.device if device == "model" else torch.device("cpu")
            t = torch.zeros(rows, piece.numel(), dtype=dtype, device=dev)
            if pin:
                t = t.pin_memory()
            self.tensors.append(t)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def zero_(self, row: int | None = None) -> None:
        for t in self.tensors:
            if row is None:
                t.zero_()
            else:
                t[row].zero_()

    def scale_(self, factors: torch.Tensor) -> None:
        """Multiply row r by ``factors[r]``."""
        for t in self.tensors:
            t.mul_(factors.to(device=t.device, dtype=t.dtype).unsqueeze(1))

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Drop all rows but these (in this order)."""
        idx = list(rows)
        self.tensors = [t[idx].contiguous() for t in self.tensors]
        self.rows = len(idx)

    def gram(self, acc_dtype: torch.dtype) -> list[torch.Tensor]:
        """Per-parameter Gram matrices ``(rows, rows)`` of the stored vectors, in ``acc_dtype`` on the CPU."""
        out = []
        for t in self.tensors:
            a = t.to(acc_dtype)
            out.append((a @ a.T).cpu())
        return out

    def module_gram(self, module_index: np.ndarray, n_modules: int, acc_dtype: torch.dtype,
                    owned: np.ndarray | None = None) -> np.ndarray:
        """Gram matrices of the stored vectors per module, ``(n_modules, rows, rows)`` float64 (with ``owned``:
        only those parameters, this rank's share of a sum across ranks)."""
        out = np.zeros((n_modules, self.rows, self.rows))
        for i, gm in enumerate(self.gram(acc_dtype)):
            if owned is None or owned[i]:
                out[module_index[i]] += gm.to(torch.float64).numpy()
        return out


class SketchStore:
    """``rows`` sketched vectors: one ``(rows, k)`` tensor, the sketch-space twin of :class:`ReferenceStore`.

    A row costs ``k × itemsize`` bytes (4 MiB at k = 2^20 in fp32) whatever the model's size. Dots
    and Gram matrices come per module, from each module's bucket range.

    Args:
        spec: the sketch map.
        rows: how many sketched vectors.
        dtype: accumulation dtype (float32, or float64 for float64 models).
        device: where the rows live.
    """

    def __init__(self, spec: SketchSpec, rows: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.spec = spec
        self.rows = rows
        self.dtype = dtype
        self.device = torch.device(device)
        self.data = torch.zeros(rows, spec.k, dtype=dtype, device=self.device)
        self._slices = spec.slices()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def zero_(self, row: int | None = None) -> None:
        (self.data if row is None else self.data[row]).zero_()

    def scale_(self, factors: torch.Tensor) -> None:
        """Multiply row r by ``factors[r]``."""
        self.data.mul_(factors.to(device=self.device, dtype=self.dtype).unsqueeze(1))

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Drop all rows but these (in this order)."""
        self.data = self.data[list(rows)].contiguous()
        self.rows = self.data.shape[0]

    def add_(self, row: int, sketch: torch.Tensor) -> None:
        """Add a sketch into one row."""
        self.data[row].add_(sketch.to(device=self.device, dtype=self.dtype))

    def module_dots(self, sketch: torch.Tensor) -> torch.Tensor:
        """Dots of ``sketch`` with every row, per module: ``(n_modules, rows)`` in the rows' dtype."""
        s = sketch.to(device=self.device, dtype=self.dtype)
        return torch.stack([self.data[:, sl] @ s[sl] for sl in self._slices])

    def module_gram(self, module_index: np.ndarray | None = None, n_modules: int | None = None,
                    acc_dtype: torch.dtype | None = None) -> np.ndarray:
        """Gram matrices of the rows per module, ``(n_modules, rows, rows)`` float64 (the arguments are
        those of :meth:`ReferenceStore.module_gram`; a sketch knows its modules)."""
        out = []
        for sl in self._slices:
            a = self.data[:, sl].to(torch.float64)
            out.append((a @ a.T).cpu().numpy())
        return np.stack(out) if out else np.zeros((0, self.rows, self.rows))
