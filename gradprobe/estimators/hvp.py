"""Hessian-vector products of a model's loss over selected parameters and a set of batches.

:class:`HessianOperator` is ``H`` of the batch-size-weighted mean loss
``L = Σ_b w_b L_b`` (``w_b ∝`` the batch's size) over the selected parameters, usable as
``H @ v``. Vectors are lists of tensors with the shapes of the selected parameters (no
flattened copy of the whole model), in float32 (float64 for float64 models) on each
parameter's device.

Backends:

``double_backward``
    Exact: ``∇(∇L · v)`` with ``create_graph=True``. Fused attention kernels (flash,
    memory-efficient, cuDNN SDPA) have no second derivative, so inside the operator
    scaled-dot-product attention is restricted to the math kernel and a transformers model
    configured with another attention implementation is switched to ``sdpa`` (restored on exit).
``forward_over_reverse``
    Exact: ``torch.func.jvp`` of ``torch.func.grad`` through ``functional_call``.
    ``Tensor.masked_scatter`` (how the MLLMs put vision features into the text
    embeddings) has no usable forward-mode derivative, so inside the operator it is
    replaced by an equivalent index-put.
``finite_difference``
    Central difference ``(∇L(θ + t v) − ∇L(θ − t v)) / 2t``: two ordinary backward
    passes per batch, any attention kernel. The parameters are set from an exact copy
    taken on entry and restored from it after every product and on exit. The step is
    ``t = r ‖θ‖ / ‖v‖`` with relative step ``r = eps^(1/3)`` of the parameters' dtype
    (fp64 6.1e-6, fp32 4.9e-3, bf16 0.20, fp16 0.10), the value that balances the
    truncation error ``O(r²)`` against the rounding error ``O(eps / r)``; the
    relative error of the product is therefore of order ``eps^(2/3)``: about 1e-10 in
    float64, 1e-4 to 1e-3 in float32 and a few percent in bfloat16. After every product
    ``fd_rounding`` holds a bound on the part of that error that comes from rounding
    ``θ ± t v`` to the parameters' dtype: ``(eps/2) √(‖θ₊‖² + ‖θ₋‖²) / (2t ‖v‖)``, which is
    about ``eps / (2√2 r)`` (float32 8.6e-6, bfloat16 1.4e-2).
``auto``
    ``double_backward``, else ``forward_over_reverse``, else ``finite_difference``: the
    first product tries them in that order and keeps the first that works; ``backend``
    says which and ``tried`` why the others were passed over.

On a model sharded with FSDP2 (``fully_shard``; every rank feeding the same batches) vectors are lists of this
rank's pieces of the parameters: dots and norms are summed across ranks (a parameter every rank holds whole
is counted on rank 0), random vectors are the single process's (each part drawn whole, then this rank's
piece taken), and gradients come from ordinary backward passes (FSDP2 reduce-scatters them into the pieces).
Only ``finite_difference`` runs there (FSDP2 has no double backward); the results equal the single
process's whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from gradprobe.errors import InputError, ModelError
from gradprobe.probe.context import measurement_mode
from gradprobe.probe.select import Selection
from gradprobe.probe.shard import ShardGroup, local

Vec = list[torch.Tensor]
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

BACKENDS = ("auto", "double_backward", "forward_over_reverse", "finite_difference")
_EXACT_ORDER = ("double_backward", "forward_over_reverse", "finite_difference")


# ---------------------------------------------------------------- vectors
class Pieces:
    """The selected parameters of an FSDP2-sharded model, as vectors see them: global shapes, this rank's
    piece of each, and the sums across ranks. :class:`HessianOperator` makes it the current one inside its
    block, where :func:`vdot`, :func:`vdots` and :func:`vrandom` use it."""

    def __init__(self, params: Sequence[torch.Tensor], group: ShardGroup) -> None:
        self.group = group
        self.shapes = [tuple(p.shape) for p in params]
        self.local_shapes = [tuple(local(p).shape) for p in params]

    def piece(self, i: int, whole: torch.Tensor) -> torch.Tensor:
        """This rank's piece of part ``i`` drawn whole (its global shape)."""
        if not self.group.sharded[i]:
            return whole
        n = math.prod(self.local_shapes[i])
        off = self.group.offsets[i]
        return whole.reshape(-1)[off : off + n].reshape(self.local_shapes[i])

    def reduce(self, per_part: np.ndarray) -> np.ndarray:
        if len(per_part) != len(self.shapes):
            raise ModelError(f"a vector of {len(per_part)} parts on {len(self.shapes)} sharded parameters")
        return self.group.all_reduce(np.where(self.group.owned, per_part, 0.0))


_PIECES: contextvars.ContextVar[Pieces | None] = contextvars.ContextVar("gradprobe_hvp_pieces", default=None)


def vdots(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> np.ndarray:
    """``⟨a_i, b_i⟩`` per part in float64 (each dot in the vectors' dtype; one transfer per device), summed
    across ranks inside a sharded operator's block."""
    parts: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        parts.setdefault(x.device, []).append((i, torch.dot(x.reshape(-1), y.reshape(-1))))
    out = np.zeros(len(a))
    for items in parts.values():
        vals = torch.stack([d for _, d in items]).to(torch.float64).cpu().numpy()
        out[[i for i, _ in items]] = vals
    pieces = _PIECES.get()
    return out if pieces is None else pieces.reduce(out)


def vdot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """``Σ_i ⟨a_i, b_i⟩``: per-tensor dots in the vectors' dtype, summed in float64 (across ranks inside a
    sharded operator's block)."""
    return float(vdots(a, b).sum())


def vnorm(a: Sequence[torch.Tensor]) -> float:
    return math.sqrt(max(vdot(a, a), 0.0))


def vaxpy(a: Sequence[torch.Tensor], alpha: float, b: Sequence[torch.Tensor]) -> Vec:
    """``a + alpha * b`` (new tensors)."""
    return [x + alpha * y for x, y in zip(a, b, strict=True)]


def vscale(a: Sequence[torch.Tensor], alpha: float) -> Vec:
    return [alpha * x for x in a]


def vrandom(like: Sequence[torch.Tensor], generator: torch.Generator, kind: str = "gaussian") -> Vec:
    """Gaussian or Rademacher entries, drawn on the CPU from ``generator`` (device-independent; inside a sharded
    operator's block each part is drawn whole and this rank's piece kept, so the vector is the single process's)."""
    if kind not in ("gaussian", "rademacher"):
        raise InputError(f"random vector kind: expected gaussian or rademacher, got {kind!r}")
    pieces = _PIECES.get()
    if pieces is not None and len(like) != len(pieces.shapes):
        raise ModelError(f"a vector of {len(like)} parts on {len(pieces.shapes)} sharded parameters")
    out = []
    for i, x in enumerate(like):
        shape = x.shape if pieces is None else pieces.shapes[i]
        if kind == "gaussian":
            r = torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            r = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
        if pieces is not None:
            r = pieces.piece(i, r)
        out.append(r.to(device=x.device, dtype=x.dtype))
    return out


def relative_step(dtype: torch.dtype) -> float:
    """The central-difference relative step ``eps^(1/3)`` of a dtype."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def batch_weight(batch: Any) -> float:
    """The size of a batch: rows of ``input_ids``/``labels``/``pixel_values`` of a mapping, of the
    first tensor of a tuple or list, or of a tensor; 1 for anything else."""
    if isinstance(batch, Mapping):
        for key in ("input_ids", "labels", "inputs_embeds"):
            t = batch.get(key)
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                return float(t.shape[0])
        return 1.0
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() > 0:
        return float(batch[0].shape[0])
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return float(batch.shape[0])
    return 1.0


# ---------------------------------------------------------------- contexts
def _attn_implementations(model: torch.nn.Module) -> dict[str, str]:
    """Attention implementation of the config and each sub-config of a transformers model."""
    cfg = getattr(model, "config", None)
    out: dict[str, str] = {}
    if cfg is None:
        return out
    impl = getattr(cfg, "_attn_implementation", None)
    if isinstance(impl, str):
        out[""] = impl
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        impl = getattr(sub, "_attn_implementation", None)
        if isinstance(impl, str):
            out[key] = impl
    return out


@contextlib.contextmanager
def exact_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, attention has a second derivative: SDPA uses its math kernel, and a
    transformers model set to another implementation (flash, flex, …) is switched to ``sdpa``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = _attn_implementations(model)
    switch = any(v not in ("eager", "sdpa") for v in before.values())
    if switch:
        setter = getattr(model, "set_attn_implementation", None)
        if setter is None:
            raise ModelError(f"attention implementation {before} has no second derivative and the model cannot "
                             "switch it; load it with attn_implementation='sdpa' or 'eager'")
        setter("sdpa")
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if switch:
            model.set_attn_implementation(before.get("", "sdpa") if len(set(before.values())) == 1 else before)


def _masked_scatter_indexed(self: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``self.masked_scatter(mask, source)`` as an index-put, which has forward-mode derivatives."""
    mask = mask.expand_as(self) if mask.shape != self.shape else mask
    idx = mask.reshape(-1).nonzero().squeeze(1)
    flat = self.reshape(-1).index_put((idx,), source.reshape(-1)[: idx.numel()])
    return flat.view(self.shape)


@contextlib.contextmanager
def forward_ad_patches() -> Iterator[None]:
    """Within the block, ``Tensor.masked_scatter`` is an index-put (forward-mode differentiable)."""
    original = torch.Tensor.masked_scatter
    torch.Tensor.masked_scatter = _masked_scatter_indexed  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.masked_scatter = original  # type: ignore[method-assign]


class _Bound(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(self.model, batch)


# ---------------------------------------------------------------- the operator
@dataclass
class MeanGradient:
    """A weighted mean gradient with its loss; per-batch losses and optional per-batch dots."""

    grad: Vec
    loss: float
    losses: list[float]
    dots: list[float] | None


class HessianOperator:
    """``H @ v`` for the weighted mean loss of ``batches`` over the selected parameters.

    Use it as a context manager; inside the block the model is in measurement state (eval
    mode, gradients only for the selected parameters) and, for ``finite_difference``, an exact
    copy of the selected parameters is kept. Everything is restored on exit, also when the
    block raises.

    Args:
        model: any ``torch.nn.Module``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: the batches whose mean loss is differentiated (a sequence; it is read at every product).
        selection: the parameters (:func:`gradprobe.probe.select_parameters`).
        backend: one of :data:`BACKENDS`.
        weights: one weight per batch (default :func:`batch_weight`); normalised to sum 1.
        fd_step: relative step ``r`` of ``finite_difference`` (default ``eps^(1/3)`` of the parameters' dtype).
        eval_mode: run the model in eval mode (no dropout; a random loss has no Hessian).

    Attributes:
        backend: the backend in use (for ``auto``: None until the first product).
        tried: ``backend → reason`` for backends ``auto`` passed over.
        n_products: Hessian-vector products computed (each one reads every batch).
        last_quads: ``vᵀ H_b v`` per batch of the last product (for intervals over batches).
        fd_rounding: the measured rounding part of the last finite-difference product's error.

    Example:
        >>> import torch
        >>> from gradprobe.probe import select_parameters
        >>> from gradprobe.estimators.hvp import HessianOperator
        >>> lin = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> loss = lambda m, b: 0.5 * (m(b) ** 2).sum()   # H = xᵀx
        >>> with HessianOperator(lin, loss, [x], select_parameters(lin), backend="double_backward") as H:
        ...     hv = H @ [torch.tensor([[1.0, 0.0]], dtype=torch.float64)]
        >>> hv[0].tolist()
        [[1.0, 2.0]]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        selection: Selection,
        *,
        backend: str = "auto",
        weights: Sequence[float] | None = None,
        fd_step: float | None = None,
        eval_mode: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise InputError(f"backend: unknown HVP backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        if not self.batches:
            raise InputError("HessianOperator: no batches")
        w = [float(x) for x in (weights if weights is not None else [batch_weight(b) for b in self.batches])]
        if len(w) != len(self.batches) or any(not math.isfinite(x) or x <= 0 for x in w):
            raise InputError("weights: need one positive finite weight per batch")
        total = sum(w)
        self.weights = [x / total for x in w]
        self.selection = selection
        self.params = list(selection.params)
        self.names = list(selection.names)
        self.vec_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.requested = backend
        self.backend: str | None = None if backend == "auto" else backend
        self.tried: dict[str, str] = {}
        self.fd_step = fd_step
        if fd_step is not None and not (0 < fd_step < 1):
            raise InputError(f"fd_step: expected a relative step in (0, 1), got {fd_step}")
        self.eval_mode = eval_mode
        self.n_products = 0
        self.last_quads: list[float] = []
        self.fd_rounding: float | None = None
        self._stack: contextlib.ExitStack | None = None
        self._backup: Vec | None = None
        self._theta_norm: float | None = None
        group = ShardGroup(self.params)
        #: this rank's pieces of a sharded model's parameters (None in one process or when nothing is sharded)
        self.pieces = Pieces(self.params, group) if group.active and bool(group.sharded.any()) else None
        if self.pieces is not None and backend in ("double_backward", "forward_over_reverse"):
            raise InputError(f"backend: {backend} has no path on a sharded model (FSDP2 has no double backward); "
                             "use finite_difference or auto")

    # ---------------------------------------------------------- lifetime
    def __enter__(self) -> HessianOperator:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(measurement_mode(self.model, self.selection, eval_mode=self.eval_mode))
            if self.pieces is not None:
                stack.callback(_PIECES.reset, _PIECES.set(self.pieces))
            stack.enter_context(self.parameters_kept())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @contextlib.contextmanager
    def parameters_kept(self) -> Iterator[None]:
        """Keep an exact copy of the selected parameters; put it back on exit."""
        if self._backup is not None:
            yield
            return
        self._backup = [local(p).detach().clone() for p in self.params]
        try:
            yield
        finally:
            self.restore()
            self._backup = None

    def restore(self) -> None:
        """Set the selected parameters back to the copy taken on entry."""
        if self._backup is None:
            return
        self._write(self._backup)

    def _write(self, values: Iterable[torch.Tensor]) -> None:
        """Set the selected parameters (this rank's pieces) to ``values``, rounded to their dtype. A sharded
        model then drops the whole parameters it still holds gathered (FSDP2 keeps the root's after a forward
        without backward), so the next forward gathers the new ones."""
        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                local(p).copy_(v)
        if self.pieces is None:
            return
        from torch.distributed.fsdp import FSDPModule

        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def on(self, batches: Sequence[Any], weights: Sequence[float] | None = None) -> HessianOperator:
        """The same operator over other batches (e.g. the video loss), sharing this one's lifetime,
        parameter copy and backend choice. Use it inside this operator's block."""
        other = HessianOperator(self.model, self.loss_fn, batches, self.selection, backend=self.backend or self.requested,
                                weights=weights, fd_step=self.fd_step, eval_mode=self.eval_mode)
        other.pieces = self.pieces
        other._stack, other._backup, other._theta_norm = self._stack, self._backup, self._theta_norm
        other.tried = dict(self.tried)
        return other

    @contextlib.contextmanager
    def displaced(self, direction: Sequence[torch.Tensor], scale: float) -> Iterator[None]:
        """Within the block the selected parameters are ``θ + scale · direction`` (rounded to their
        dtype, as an optimizer step would be), ``θ`` being the copy taken on entry."""
        self._need_entered()
        assert self._backup is not None
        try:
            self._write(b.to(torch.float64) + scale * d.to(device=b.device, dtype=torch.float64)
                        for b, d in zip(self._backup, direction, strict=True))
            yield
        finally:
            self.restore()

    def loss_noise(self, seed: int = 0, repeats: int = 2) -> float:
        """How much the loss moves when every selected parameter moves by one rounding unit of its
        dtype (random signs): the smallest loss change this model and dtype can resolve near θ."""
        self._need_entered()
        assert self._backup is not None
        base = self.loss()
        gen = torch.Generator().manual_seed(seed)
        worst = 0.0
        for _ in range(repeats):
            try:
                moved = []
                for i, (p, b) in enumerate(zip(self.params, self._backup, strict=True)):
                    sign = torch.randint(0, 2, p.shape, generator=gen).to(torch.float64) * 2 - 1
                    if self.pieces is not None:
                        sign = self.pieces.piece(i, sign)
                    moved.append(b.to(torch.float64) * (1 + torch.finfo(p.dtype).eps * sign.to(b.device)))
                self._write(moved)
                worst = max(worst, abs(self.loss() - base))
            finally:
                self.restore()
        return worst

    def _need_entered(self) -> None:
        if self._stack is None:
            raise InputError("HessianOperator is used as a context manager: `with HessianOperator(...) as H:`")

    # ---------------------------------------------------------- vectors
    def zeros(self) -> Vec:
        return [torch.zeros(local(p).shape, dtype=self.vec_dtype, device=p.device) for p in self.params]

    def random(self, generator: torch.Generator, kind: str = "gaussian") -> Vec:
        return vrandom(self.zeros(), generator, kind)

    @property
    def fd_relative_step(self) -> float:
        """``r`` of ``finite_difference``: ``fd_step``, or ``eps^(1/3)`` of the coarsest parameter dtype."""
        return self.fd_step if self.fd_step is not None else max(relative_step(p.dtype) for p in self.params)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    # ---------------------------------------------------------- losses and gradients
    def loss(self) -> float:
        """The weighted mean loss at the current parameters (no gradient)."""
        total = 0.0
        with torch.no_grad():
            for w, b in zip(self.weights, self.batches, strict=True):
                total += w * float(self.loss_fn(self.model, b).detach().to(torch.float64))
        return total

    def gradient(self, dot_with: Sequence[torch.Tensor] | None = None) -> MeanGradient:
        """The weighted mean gradient and loss, with per-batch losses and, if ``dot_with`` is
        given, each batch's gradient dotted with it."""
        self._need_entered()
        out = self.zeros()
        losses, dots = [], []
        for w, b in zip(self.weights, self.batches, strict=True):
            loss, grads = self._grad(b)
            losses.append(loss)
            g = [torch.zeros_like(o) if gi is None else gi.to(o.dtype) for gi, o in zip(grads, out, strict=True)]
            if dot_with is not None:
                dots.append(vdot(g, dot_with))
            for o, gi in zip(out, g, strict=True):
                o.add_(gi, alpha=w)
        return MeanGradient(out, sum(w * x for w, x in zip(self.weights, losses, strict=True)), losses,
                            dots if dot_with is not None else None)

    def _grad(self, batch: Any, create_graph: bool = False) -> tuple[float, tuple[torch.Tensor | None, ...]]:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InputError("loss_fn must return a scalar tensor")
        if not loss.requires_grad:
            raise InputError("loss_fn returned a tensor that does not require grad: no selected parameter is in its graph")
        if self.pieces is not None:  # FSDP2: an ordinary backward, which reduce-scatters into the pieces' .grad
            for p in self.params:
                p.grad = None
            loss.backward()
            grads = tuple(None if p.grad is None else local(p.grad) for p in self.params)
            for p in self.params:
                p.grad = None
            return float(loss.detach()), grads
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        return float(loss.detach()), grads

    # ---------------------------------------------------------- products
    def __matmul__(self, v: Sequence[torch.Tensor]) -> Vec:
        return self.matvec(v)

    def matvec(self, v: Sequence[torch.Tensor]) -> Vec:
        """``H v`` (weighted mean over the batches); also sets ``last_quads``."""
        self._need_entered()
        v = [x.to(dtype=self.vec_dtype, device=p.device) for x, p in zip(v, self.params, strict=True)]
        if len(v) != len(self.params):
            raise InputError(f"vector has {len(v)} parts, the operator {len(self.params)} parameters")
        if self.backend is None:
            return self._auto(v)
        out = self._products[self.backend](self, v)
        self.n_products += 1
        return out

    def _auto(self, v: Vec) -> Vec:
        for name in _EXACT_ORDER:
            if self.pieces is not None and name != "finite_difference":
                self.tried[name] = "no path on a sharded model (FSDP2 has no double backward)"
                continue
            try:
                out = self._products[name](self, v)
            except (RuntimeError, NotImplementedError, TypeError) as e:
                self.restore()
                self.tried[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if not all(torch.isfinite(x).all() for x in out) and name != _EXACT_ORDER[-1]:
                self.tried[name] = "non-finite product"
                continue
            self.backend = name
            self.n_products += 1
            return out
        raise ModelError("no HVP backend works for this model: " +
                         "; ".join(f"{k}: {v}" for k, v in self.tried.items()))

    def _accumulate(self, per_batch: Callable[[Any], Vec], v: Vec) -> Vec:
        out = self.zeros()
        quads = []
        for w, b in zip(self.weights, self.batches, strict=True):
            hv = per_batch(b)
            quads.append(vdot(hv, v))
            for o, h in zip(out, hv, strict=True):
                o.add_(h, alpha=w)
        self.last_quads = quads
        return out

    def _double_backward(self, v: Vec) -> Vec:
        def one(batch: Any) -> Vec:
            _, grads = self._grad(batch, create_graph=True)
            terms = [(g * x.to(g.dtype)).sum() for g, x in zip(grads, v, strict=True) if g is not None]
            dot = torch.stack(terms).sum() if terms else None
            if dot is None or not dot.requires_grad:  # the loss is linear in the parameters
                return self.zeros()
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            return [torch.zeros_like(x) if h is None else h.to(self.vec_dtype) for h, x in zip(hv, v, strict=True)]

        with exact_attention(self.model):
            return self._accumulate(one, v)

    def _forward_over_reverse(self, v: Vec) -> Vec:
        from torch.func import functional_call, grad, jvp

        bound = _Bound(self.model, self.loss_fn)
        keys = ["model." + n for n in self.names]
        primals = tuple(p.detach() for p in self.params)
        tangents = tuple(x.to(p.dtype) for x, p in zip(v, self.params, strict=True))

        def one(batch: Any) -> Vec:
            def f(ps: tuple[torch.Tensor, ...]) -> torch.Tensor:
                return functional_call(bound, dict(zip(keys, ps, strict=True)), (batch,), strict=False)

            _, hv = jvp(grad(f), (primals,), (tangents,))
            return [h.to(self.vec_dtype) for h in hv]

        with exact_attention(self.model), forward_ad_patches():
            return self._accumulate(one, v)

    def _finite_difference(self, v: Vec) -> Vec:
        backup = self._backup
        assert backup is not None
        if self._theta_norm is None:
            self._theta_norm = vnorm([b.to(self.vec_dtype) for b in backup])
        theta = self._theta_norm
        vn = vnorm(v)
        if vn == 0:
            self.last_quads = [0.0] * len(self.batches)
            return self.zeros()
        r = self.fd_relative_step
        t = r * (theta if theta > 0 else 1.0) / vn
        out = self.zeros()
        side: dict[float, list[float]] = {}
        try:
            for sign in (1.0, -1.0):
                self._write(torch.add(b, x, alpha=sign * t) for b, x in zip(backup, v, strict=True))
                dots = []
                for w, b in zip(self.weights, self.batches, strict=True):
                    _, grads = self._grad(b)
                    g = [torch.zeros_like(x) if gi is None else gi.to(self.vec_dtype) for gi, x in zip(grads, v, strict=True)]
                    dots.append(vdot(g, v))
                    for o, gi in zip(out, g, strict=True):
                        o.add_(gi, alpha=sign * w / (2 * t))
                side[sign] = dots
        finally:
            self.restore()
        self.last_quads = [(a - c) / (2 * t) for a, c in zip(side[1.0], side[-1.0], strict=True)]
        # rounding θ ± t v to the parameters' dtype moves each entry by at most eps/2 of its size:
        # a bound on that part of the error, relative to ‖v‖; ‖θ₊‖² + ‖θ₋‖² = 2(‖θ‖² + t²‖v‖²)
        eps = max(torch.finfo(p.dtype).eps for p in self.params)
        sq = 2 * (theta**2 + (t * vn) ** 2)
        self.fd_rounding = eps / 2 * math.sqrt(sq) / (2 * t * vn)
        return out

    _products: ClassVar[dict[str, Callable[[HessianOperator, Vec], Vec]]] = {
        "double_backward": _double_backward,
        "forward_over_reverse": _forward_over_reverse,
        "finite_difference": _finite_difference,
    }

    def info(self) -> dict[str, Any]:
        """JSON-safe description of the operator."""
        return {
            "backend": self.backend,
            "requested": self.requested,
            "tried": dict(self.tried),
            "products": self.n_products,
            "batches": len(self.batches),
            "fd_relative_step": self.fd_relative_step if self.backend == "finite_difference" else None,
            "fd_rounding": self.fd_rounding,
        }
