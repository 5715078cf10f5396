"""Gradient sketch: a seeded CountSketch ``S: ℝ^P → ℝ^k`` applied parameter by parameter in the hooks.

Every element of parameter ``name`` at global flat offset ``i`` (its position in the whole,
unsharded parameter, row-major) goes to one bucket with one sign. Bucket and sign come from a
counter-based hash (the SplitMix64 finaliser) of ``(seed, name, i)``, computed on the fly: no index
table, no state of the size of the model, nothing kept between backwards. So

* the same seed gives the same S in every process, device, dtype and sharding: the sketch of a
  gradient split into pieces (FSDP2 shards, ZeRO-3 partitions, chunks) is the sum of the sketches
  of its pieces, each placed at its global offset;
* sketches saved by one run combine with those of another run or checkpoint of the same model and
  parameter selection (:attr:`SketchSpec.fingerprint` tells whether two maps are the same).

**Modules.** The k buckets are partitioned between modules (each first gets ``min(MIN_WIDTH, its
number of elements)`` buckets where k allows, else one; the rest go in proportion to their numbers of
elements), so one sketch gives every module's inner products: the
dot of two sketches over a module's bucket range estimates that module's inner product, and the
sum over modules is the dot of the whole sketches.

**Precision.** ``⟨Sa, Sb⟩`` is unbiased for ``⟨a, b⟩`` over the hash, and for a module with w
buckets (a fully random hash)

    Var⟨Sa, Sb⟩ = (‖a‖²‖b‖² + ⟨a, b⟩² − 2 Σ_i a_i² b_i²) / w,

summed over modules (different modules never share a bucket). :func:`inner_variance` estimates it
from squared norms and the sketched inner products themselves (dropping the last, non-negative
term: conservative). For cosines that is ``σ ≈ √((1 + cos²)/k)``: about 1e-3 at k = 2^20 and 5e-4
at k = 2^22. The accumulation is fp32 (fp64 for fp64 gradients).

**Work.** Three implementations compute the same map: a pure-torch one on any device (the
reference; chunked so its temporaries stay small), a compiled CPU kernel (numba; a piece much larger
than its module's bucket range is split between torch's threads, each adding into private buckets),
and a fused GPU kernel (Triton) where one is available. Buckets and signs
agree exactly between them; sums agree to rounding (the order of additions into a bucket differs).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradprobe.errors import InputError

__all__ = ["DEFAULT_K", "SketchSpec", "inner_variance", "param_key", "sketch_add", "sketch_buckets"]

#: Default number of buckets (4 MiB per fp32 sketch; cosine error σ ≈ 1e-3).
DEFAULT_K = 1 << 20
#: Buckets every module gets first (or its number of elements, if fewer) where k allows: with a few buckets
#: a module's sketch error is far from normal and its stated sd is no guide (one or two buckets gave squared
#: z-scores of 17 on the toy's final norm).
MIN_WIDTH = 32
#: Largest k (bucket arithmetic is 32 × 31 bits).
MAX_K = 1 << 31
#: Version of the hash: sketches of different versions never combine.
HASH_VERSION = 1

_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_M64 = (1 << 64) - 1
_CHUNK = 1 << 20  # elements per chunk of the torch path (int64 temporaries of 8 MiB)


def _signed(x: int) -> int:
    """A uint64 as the int64 with the same bits (what torch's int64 arithmetic wraps in)."""
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def param_key(seed: int, name: str) -> int:
    """The 64-bit key of one parameter: a hash of the seed and the parameter's name (not Python's ``hash``,
    which changes between processes)."""
    h = hashlib.blake2b(f"gradprobe-sketch/{HASH_VERSION}:{int(seed)}:{name}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class SketchSpec:
    """A sketch map: k buckets, a seed, and the bucket range of each module.

    Args:
        k: total number of buckets.
        seed: the seed of the hash.
        modules: module keys, in the order of their bucket ranges.
        widths: buckets per module (summing to k).
    """

    k: int
    seed: int
    modules: tuple[str, ...]
    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.modules) != len(self.widths):
            raise InputError("sketch: one width per module is needed")
        if any(w < 1 for w in self.widths) or sum(self.widths) != self.k:
            raise InputError(f"sketch: module widths must be >= 1 and sum to k={self.k}")

    @classmethod
    def build(cls, module_numel: Sequence[tuple[str, int]], k: int = DEFAULT_K, seed: int = 0) -> SketchSpec:
        """Partition k buckets between modules: first ``min(MIN_WIDTH, numel)`` each (at least one; one each
        where k is too small for that), the rest in proportion to their numbers of elements (largest
        remainders).

        Raises:
            InputError: k is not an integer ≥ the number of modules.
        """
        names = [n for n, _ in module_numel]
        sizes = np.array([max(int(s), 0) for _, s in module_numel], dtype=np.float64)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < max(len(names), 1):
            raise InputError(f"sketch: k={k!r} buckets cannot give each of {len(names)} modules at least one; "
                             "use a larger k")
        if k > MAX_K:
            raise InputError(f"sketch: k={k} is above the largest supported {MAX_K} (2^31)")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise InputError(f"sketch: seed must be an integer, got {seed!r}")
        n = len(names)
        base = np.maximum(np.minimum(sizes, MIN_WIDTH), 1).astype(np.int64)
        if base.sum() > k:
            base = np.ones(n, dtype=np.int64)
        free = int(k) - int(base.sum())  # the floor of each module first, the rest in proportion
        share = sizes / sizes.sum() * free if sizes.sum() > 0 else np.full(n, free / max(n, 1))
        widths = np.floor(share).astype(np.int64)
        rest = free - int(widths.sum())
        if rest:
            widths[np.argsort(-(share - widths), kind="stable")[:rest]] += 1
        return cls(int(k), int(seed), tuple(names), tuple(int(w) + int(b) for w, b in zip(widths, base, strict=True)))

    @functools.cached_property
    def starts(self) -> tuple[int, ...]:
        """First bucket of each module."""
        return tuple(int(s) for s in np.concatenate([[0], np.cumsum(self.widths)[:-1]]))

    def plan(self, names: Sequence[str], modules: Sequence[str], offsets: Sequence[int] | None = None,
             ) -> list[tuple[int, int, int, int]]:
        """Per parameter (by name, module key and global offset of its piece, 0 for whole parameters): the
        arguments :func:`sketch_add` takes after the values, ``(key, offset, start, width)``."""
        pos = {m: i for i, m in enumerate(self.modules)}
        offs = offsets if offsets is not None else [0] * len(names)
        return [(param_key(self.seed, n), int(o), self.starts[pos[m]], self.widths[pos[m]])
                for n, m, o in zip(names, modules, offs, strict=True)]

    def slices(self) -> list[slice]:
        """Bucket range of each module."""
        return [slice(s, s + w) for s, w in zip(self.starts, self.widths, strict=True)]

    def to_dict(self) -> dict[str, object]:
        return {"hash_version": HASH_VERSION, "k": self.k, "seed": self.seed, "modules": list(self.modules),
                "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SketchSpec:
        if d.get("hash_version") != HASH_VERSION:
            raise InputError(f"sketch: hash version {d.get('hash_version')!r}, this gradprobe reads {HASH_VERSION}")
        return cls(int(d["k"]), int(d["seed"]), tuple(d["modules"]), tuple(int(w) for w in d["widths"]))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the map: equal fingerprints, combinable sketches."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the hash, in torch


def sketch_buckets(key: int, offset: int, n: int, width: int, device: torch.device | str = "cpu",
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets (int64, in ``[0, width)``) and negative-sign flags of elements ``offset … offset+n−1``.

    The reference implementation of the map: SplitMix64 of ``key + (i+1)·φ``; the sign is the top bit,
    the bucket ``⌊(low 32 bits) · width / 2³²⌋``.
    """
    z = torch.arange(offset + 1, offset + n + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(_GOLDEN)).add_(_signed(key))
    for shift, mult in ((30, _C1), (27, _C2)):
        z.bitwise_xor_(torch.bitwise_right_shift(z, shift).bitwise_and_((1 << (64 - shift)) - 1)).mul_(_signed(mult))
    z.bitwise_xor_(torch.bitwise_right_shift(z, 31).bitwise_and_((1 << 33) - 1))
    neg = z < 0
    bucket = z.bitwise_and_(0xFFFFFFFF).mul_(int(width)).bitwise_right_shift_(32)
    return bucket, neg


def _add_torch(buf: torch.Tensor, values: torch.Tensor, key: int, offset: int, start: int, width: int) -> None:
    view = buf[start : start + width]
    for c in range(0, values.numel(), _CHUNK):
        v = values[c : c + _CHUNK]
        bucket, neg = sketch_buckets(key, offset + c, v.numel(), width, v.device)
        view.index_add_(0, bucket, torch.where(neg, -v, v))


# ---------------------------------------------------------------------------- compiled kernels


#: A piece at least this many times its bucket range is split between threads (each with private buckets).
_PARALLEL_RATIO = 8


@functools.cache
def _numba_kernels():  # pragma: no cover - exercised where numba is installed
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(cache=True, nogil=True, inline="always")
    def add_range(buf, values, key, offset, start, width, lo, hi):
        k = np.uint64(key)
        w = np.uint64(width)
        for t in range(lo, hi):
            z = k + np.uint64(offset + t + 1) * np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            b = ((z & np.uint64(0xFFFFFFFF)) * w) >> np.uint64(32)
            v = values[t]
            if z >> np.uint64(63):
                v = -v
            buf[start + b] += v

    @numba.njit(cache=True, nogil=True)
    def add(buf, values, key, offset, start, width):
        add_range(buf, values, key, offset, start, width, 0, values.shape[0])

    @numba.njit(cache=True, nogil=True, parallel=True)
    def add_parallel(buf, values, key, offset, start, width, parts):
        n = values.shape[0]
        step = (n + parts - 1) // parts
        private = np.zeros((parts, width), dtype=buf.dtype)
        for p in numba.prange(parts):
            add_range(private[p], values, key, offset, 0, width, p * step, min(n, (p + 1) * step))
        for p in range(parts):  # in a fixed order: the same sums for the same number of parts
            buf[start : start + width] += private[p]

    return add, add_parallel


def _add_numba(buf: torch.Tensor, values: torch.Tensor, key: int, offset: int, start: int, width: int) -> bool:
    kernels = _numba_kernels()
    if kernels is None:
        return False
    add, add_parallel = kernels
    threads = torch.get_num_threads()
    if threads > 1 and values.numel() >= _PARALLEL_RATIO * width:
        add_parallel(buf.numpy(), values.numpy(), np.uint64(key), offset, start, width, threads)
    else:
        add(buf.numpy(), values.numpy(), np.uint64(key), offset, start, width)
    return True


BACKENDS = ("auto", "torch", "numba", "triton")


def sketch_add(buf: torch.Tensor, values: torch.Tensor, key: int, offset: int, start: int, width: int,
               backend: str = "auto") -> None:
    """Add the sketch of ``values`` (a flat piece of one parameter starting at global element ``offset``)
    into the bucket range ``start … start+width−1`` of ``buf``.

    ``values`` must already have ``buf``'s dtype and device. ``backend``: ``torch`` (any device),
    ``numba`` (CPU), ``triton`` (CUDA), or ``auto`` (the compiled kernel for the device when available,
    else torch).
    """
    if backend not in BACKENDS:
        raise InputError(f"sketch backend: unknown {backend!r}; use one of {', '.join(BACKENDS)}")
    values = values.reshape(-1)
    if values.numel() == 0:
        return
    if buf.device.type == "cpu":
        if backend in ("auto", "numba") and values.is_contiguous() and _add_numba(buf, values, key, offset, start,
                                                                                   width):
            return
        if backend == "numba":
            raise InputError("sketch backend numba: numba is not installed")
    elif buf.device.type == "cuda" and backend in ("auto", "triton"):
        from gradprobe.probe import _triton

        if _triton.available():
            _triton.sketch_add(buf, values, key, offset, start, width)
            return
        if backend == "triton":
            raise InputError("sketch backend triton: Triton is not available on this device")
    elif backend in ("numba", "triton"):
        raise InputError(f"sketch backend {backend}: not available for {buf.device.type} tensors")
    _add_torch(buf, values, key, offset, start, width)


# ---------------------------------------------------------------------------- precision


def inner_variance(sq_a: np.ndarray, sq_b: np.ndarray, inner: np.ndarray, widths: Sequence[int]) -> np.ndarray:
    """Variance of sketched inner products, per module: ``(‖a‖²‖b‖² + ⟨a,b⟩²) / w`` (an upper bound of the
    exact formula, which also subtracts ``2 Σ a_i² b_i² / w``).

    Arguments broadcast; the last axis is the module. Sum over it for the whole inner product.
    """
    w = np.asarray(widths, dtype=np.float64)
    return (np.maximum(sq_a, 0.0) * np.maximum(sq_b, 0.0) + np.square(inner)) / w
