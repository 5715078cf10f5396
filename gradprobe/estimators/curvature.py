"""The curvature side of Proposition 1: β, q, η0 and a one-step lookahead per frame budget.

For the empirical losses of the given batches (``L_img``: the weighted mean over K image
batches; ``L_vid^(m)``: over J video batches at budget m, the same clips at every m), with
``g_img``, ``g_vid^(m)`` their gradients and ``H_img``, ``H_vid^(m)`` their Hessians over the
selected parameters θ, and a Video-SFT step ``θ⁺ = θ − η g_vid^(m)``:

* ``A = ⟨g_img, g_vid^(m)⟩`` and ``q = g_vidᵀ H_img g_vid`` (one HVP);
* Eq. 8 at θ: ``ΔL_img ≈ −η A + η²/2 q``;
* Eq. 13 and its mirror: ``−η A − β_img η²/2 ‖g_vid‖² ≤ ΔL_img ≤ −η A + β_img η²/2 ‖g_vid‖²``
  (β_img bounds ``‖H_img‖`` on the segment only approximately: it is measured at θ);
* Eq. 11: ``η0 = −2A / (β_img ‖g_vid‖²)`` when ``A < 0``: below it the step surely raises L_img;
* Eq. 14: ``ΔL_vid ≤ −η (1 − β_vid η / 2) ‖g_vid‖²``, and the second-order value
  ``−η ‖g_vid‖² + η²/2 g_vidᵀ H_vid g_vid``;
* the lookahead applies θ⁺ (rounded to the parameters' dtype, as a real step), measures the
  actual ``ΔL_img`` and ``ΔL_vid`` on the same batches, and restores θ from an exact copy.

β is the largest |eigenvalue| of the Hessian (Lanczos or power iteration; the top and the
bottom eigenvalue are both reported). Intervals: A over the video batches (ḡ_img held
fixed), q over the image batches (ḡ_vid held fixed); β has no sampling interval (it is
the spectral norm of these batches' Hessian; its ``residual`` bounds the numerical error).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from gradprobe import outputs as io
from gradprobe._checks import check_frames, check_positive_int
from gradprobe._version import __version__
from gradprobe.errors import DataError, InputError, RunInterrupted
from gradprobe.estimators import stats
from gradprobe.estimators.align import Progress
from gradprobe.estimators.hvp import BACKENDS, HessianOperator, LossFn, Vec, vdot, vdots, vrandom
from gradprobe.estimators.spectrum import METHODS, Spectrum, extreme_eigenvalues, hutchinson_trace, lanczos
from gradprobe.probe.select import ModuleOf, RoleOf, select_parameters

__all__ = ["CurvatureInterrupted", "CurvatureReport", "curvature", "parse_lrs"]

SCHEMA, LOOKAHEAD, MODULES, SPECTRA = io.CURVATURE_SCHEMA, io.LOOKAHEAD, io.CURVATURE_MODULES, io.SPECTRA


@dataclass
class CurvatureReport:
    """Result of :func:`curvature`.

    Attributes:
        summary: the dict written to ``summary.json`` (schema ``gradprobe.curvature/1``).
        steps: one row per budget × learning rate: predictions and the lookahead (``lookahead.csv``).
        modules: one row per budget × module: A, ‖g_vid‖², q per module (``curvature_modules.csv``).
        spectra: convergence history of every eigenvalue run (``spectra.csv``).
    """

    summary: dict[str, Any]
    steps: pd.DataFrame
    modules: pd.DataFrame
    spectra: pd.DataFrame

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.steps.to_csv(d / LOOKAHEAD, index=False)
        self.modules.to_csv(d / MODULES, index=False)
        self.spectra.to_csv(d / SPECTRA, index=False)
        io.write_json(d / io.SUMMARY, self.summary)
        return d


class CurvatureInterrupted(RunInterrupted):
    """Raised when a run is interrupted; ``.report`` (an :class:`CurvatureReport`) holds everything computed so far."""

    what = "curvature run"


def parse_lrs(spec: str | float | Sequence[float]) -> list[float]:
    """Learning rates η from ``"1e-5,1e-4"``, a number or a list; each must be positive and finite."""
    items: list[Any]
    if isinstance(spec, str):
        items = [x.strip() for x in spec.split(",") if x.strip()]
    elif isinstance(spec, (int, float)):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise InputError("lr: give at least one learning rate")
    out = []
    for x in items:
        try:
            v = float(x)
        except (TypeError, ValueError):
            raise InputError(f"lr: {x!r} is not a number") from None
        if not (v > 0 and math.isfinite(v)):
            raise InputError(f"lr: learning rates must be positive and finite, got {x!r}")
        out.append(v)
    return out


def check_options(lrs: str | float | Sequence[float], backend: str, method: str, max_iter: int, tol: float,
                  trace_samples: int, fd_step: float | None, sep: str = "_") -> list[float]:
    """Validate the options of :func:`curvature` (``sep="-"`` names them as command-line flags);
    returns the learning rates."""
    lr_list = parse_lrs(lrs)
    if backend not in BACKENDS:
        raise InputError(f"backend: unknown HVP backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if method not in METHODS:
        raise InputError(f"method: unknown eigenvalue method {method!r}; use {' or '.join(METHODS)}")
    check_positive_int(f"max{sep}iter", max_iter)
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise InputError(f"tol: expected a relative tolerance in (0, 1), got {tol!r}")
    if fd_step is not None and not 0 < fd_step < 1:
        raise InputError(f"fd{sep}step: expected a relative step in (0, 1), got {fd_step}")
    check_positive_int(f"trace{sep}samples", trace_samples, minimum=0)
    return lr_list


def _spectrum_rows(label: str, s: Spectrum) -> list[dict[str, Any]]:
    return [{"operator": label, "method": s.method, **h} for h in s.history]


def _counting(op: HessianOperator, progress: Progress, phase: str) -> Callable[[Vec], Vec]:
    def mv(v: Vec) -> Vec:
        out = op @ v
        progress.advance(phase)
        return out

    return mv


def _block(matvec: Callable[[Vec], Vec], keep: Sequence[bool]) -> Callable[[Vec], Vec]:
    """The diagonal block of an operator on the parameters marked in ``keep``."""

    def mv(v: Vec) -> Vec:
        vin = [x if k else torch.zeros_like(x) for x, k in zip(v, keep, strict=True)]
        return [y if k else torch.zeros_like(y) for y, k in zip(matvec(vin), keep, strict=True)]

    return mv


def curvature(
    model: torch.nn.Module,
    image_batches: Iterable[Any],
    video_batches: Mapping[int, Iterable[Any]],
    loss_fn: LossFn,
    *,
    lrs: str | float | Sequence[float] = (1e-5,),
    backend: str = "auto",
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-3,
    beta_vid: bool = True,
    trace_samples: int = 0,
    per_module: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    roles: str | Sequence[str] | None = None,
    role_of: RoleOf | None = None,
    module_of: ModuleOf | None = None,
    weights: Callable[[Any], float] | None = None,
    fd_step: float | None = None,
    eval_mode: bool = True,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    meta: Mapping[str, Any] | None = None,
) -> CurvatureReport:
    """Measure β, q, η0 and the one-step lookahead of Eq. 8/11/13/14 at every frame budget.

    Args:
        model: any ``torch.nn.Module`` (eval mode during the run, restored after; its parameters
            are restored exactly after every displacement).
        image_batches: K image minibatches (L_img is their weighted mean loss).
        video_batches: frame budget m → its video minibatches (the same clips at every m).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        lrs: step sizes η for the predictions and the lookahead.
        backend: HVP backend (:data:`gradprobe.estimators.hvp.BACKENDS`).
        method: ``lanczos`` or ``power`` for β.
        max_iter, tol: caps and tolerance of the eigenvalue runs (see :mod:`gradprobe.estimators.spectrum`).
        beta_vid: also estimate β_vid^(m) for Eq. 14 (one eigenvalue run per budget).
        trace_samples: Hutchinson probe vectors for ``tr H_img`` (0: skip).
        per_module: also estimate β_img of each module's diagonal Hessian block (Lanczos).
        include, exclude, roles, role_of, module_of: parameter selection.
        weights: ``weights(batch) -> float`` (default: batch size, :func:`gradprobe.estimators.hvp.batch_weight`).
        fd_step: relative step of the finite-difference backend.
        eval_mode: run the model in eval mode.
        seed: seed of the random start and probe vectors.
        out_dir: rows of ``lookahead.csv`` are written there as computed, everything at the end
            (also on interruption).
        progress: progress callbacks.
        meta: extra JSON-safe fields recorded under ``summary["meta"]``.

    Memory: besides the model, about five vectors the size of the selected parameters
    (a copy of θ, g_img, g_vid, H g_vid and the HVP output; float32, float64 for float64
    models), plus ``max_iter`` more for Lanczos' reorthogonalisation.

    Raises:
        InputError, BudgetError: bad options; DataError: no batches or a non-finite loss;
        ModelError: no HVP backend works; CurvatureInterrupted: on KeyboardInterrupt, with the
        partial report (saved to ``out_dir``).
    """
    if not isinstance(video_batches, Mapping):
        raise InputError("video_batches must map each frame budget m to its batches")
    frames = check_frames(video_batches.keys())
    lr_list = check_options(lrs, backend, method, max_iter, tol, trace_samples, fd_step)
    images = list(image_batches)
    if not images:
        raise DataError("no image batches")
    progress = progress or Progress()
    selection = select_parameters(model, include=include, exclude=exclude, roles=roles, role_of=role_of,
                                  module_of=module_of)
    mods = selection.module_names
    midx = {m: i for i, m in enumerate(mods)}
    pmod = [midx[m] for m in selection.modules]
    weigh = weights or None
    w_img = [weigh(b) for b in images] if weigh else None
    warn_list: list[str] = []

    def warn(msg: str) -> None:
        warn_list.append(msg)
        warnings.warn(msg, stacklevel=3)

    def per_mod(a: Vec, b: Vec) -> np.ndarray:
        out = np.zeros(len(mods))
        np.add.at(out, pmod, vdots(a, b))
        return out

    step_rows: list[dict[str, Any]] = []
    module_rows: list[dict[str, Any]] = []
    spectra_rows: list[dict[str, Any]] = []
    budgets: list[dict[str, Any]] = []
    image_part: dict[str, Any] = {}
    module_beta: dict[str, Any] = {}
    sink = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        sink = io.RowSink(Path(out_dir) / LOOKAHEAD)
    complete = True
    op_info: dict[str, Any] = {}
    kw = {"max_iter": max_iter, "tol": tol, "seed": seed}
    try:
        with HessianOperator(model, loss_fn, images, selection, backend=backend, weights=w_img, fd_step=fd_step,
                             eval_mode=eval_mode) as H_img:
            progress.start("image gradient", None)
            gi = H_img.gradient()
            progress.finish("image gradient")
            if not math.isfinite(gi.loss) or not all(torch.isfinite(x).all() for x in gi.grad):
                raise DataError("the image loss or its gradient is not finite")
            g_img = gi.grad
            phase = f"β_img ({method})"
            progress.start(phase, None)
            s_img = extreme_eigenvalues(_counting(H_img, progress, phase), H_img.zeros(), method, **kw)
            progress.finish(phase)
            spectra_rows += _spectrum_rows("image", s_img)
            if not s_img.converged:
                warn(f"β_img: {method} did not reach tol={tol} in {max_iter} products; β_img is a lower estimate")
            image_part = {
                "n_batches": len(images), "loss": gi.loss, "norm": math.sqrt(vdot(g_img, g_img)),
                "beta": s_img.to_dict(history=False), "noise": H_img.loss_noise(seed),
            }
            if trace_samples:
                progress.start("trace (Hutchinson)", trace_samples)
                tr = hutchinson_trace(_counting(H_img, progress, "trace (Hutchinson)"), H_img.zeros(),
                                      samples=trace_samples, seed=seed)
                progress.finish("trace (Hutchinson)")
                image_part["trace"] = tr.to_dict()
            if per_module:
                for name in mods:
                    keep = [mods[pmod[i]] == name for i in range(len(pmod))]
                    start = [x if k else torch.zeros_like(x)
                             for x, k in zip(vrandom(H_img.zeros(), torch.Generator().manual_seed(seed)), keep,
                                             strict=True)]
                    phase = f"β_img {name}"
                    progress.start(phase, None)
                    sm = lanczos(_block(_counting(H_img, progress, phase), keep), H_img.zeros(), start=start, **kw)
                    progress.finish(phase)
                    spectra_rows += _spectrum_rows(f"image:{name}", sm)
                    module_beta[name] = sm.to_dict(history=False)
            beta_img = s_img.beta

            for m in frames:
                phase = f"frames={m}"
                progress.start(phase, None)
                vids = list(video_batches[m])  # one budget's batches in memory at a time
                if not vids:
                    raise DataError(f"frames={m}: no video batches")
                w_vid = [weigh(b) for b in vids] if weigh else None
                H_vid = H_img.on(vids, w_vid)
                gv = H_vid.gradient(dot_with=g_img)
                if not math.isfinite(gv.loss) or not all(torch.isfinite(x).all() for x in gv.grad):
                    warn(f"frames={m}: the video loss or its gradient is not finite; budget skipped")
                    budgets.append({"frames": m, "finite": False})
                    progress.finish(phase)
                    continue
                g_vid = gv.grad
                A = vdot(g_img, g_vid)
                sq = vdot(g_vid, g_vid)
                _, a_se, a_ci = stats.weighted_mean_ci(gv.dots or [], H_vid.weights)
                Hg = H_img @ g_vid
                progress.advance(phase)
                q = vdot(g_vid, Hg)
                _, q_se, q_ci = stats.weighted_mean_ci(H_img.last_quads, H_img.weights)
                q_vid = vdot(g_vid, H_vid @ g_vid)
                progress.advance(phase)
                s_vid = None
                if beta_vid:
                    s_vid = extreme_eigenvalues(_counting(H_vid, progress, phase), H_vid.zeros(), method, **kw)
                    spectra_rows += _spectrum_rows(f"video m={m}", s_vid)
                    if not s_vid.converged:
                        warn(f"β_vid (frames={m}): {method} did not reach tol={tol} in {max_iter} products")
                noise_vid = H_vid.loss_noise(seed)
                eta0 = -2 * A / (beta_img * sq) if A < 0 and beta_img > 0 and sq > 0 else None
                b_vid = s_vid.beta if s_vid is not None else None
                mod_A, mod_sq, mod_q = per_mod(g_img, g_vid), per_mod(g_vid, g_vid), per_mod(g_vid, Hg)
                for i, name in enumerate(mods):
                    module_rows.append({
                        "frames": m, "module": name, "role": selection.roles[pmod.index(i)],
                        "numel": sum(selection.params[k].numel() for k in range(len(pmod)) if pmod[k] == i),
                        "A": mod_A[i], "sqnorm_vid": mod_sq[i], "q": mod_q[i],
                        "q_share": mod_q[i] / q if q != 0 else None,
                        "beta_img_block": module_beta.get(name, {}).get("beta"),
                    })
                steps = []
                for eta in lr_list:
                    with H_img.displaced(g_vid, -eta):
                        l_img = H_img.loss()
                        l_vid = H_vid.loss()
                    row = _step_row(m, eta, A, sq, q, q_vid, beta_img, b_vid, eta0, gi.loss, gv.loss, l_img, l_vid,
                                    image_part["noise"], noise_vid)
                    steps.append(row)
                    step_rows.append(row)
                    if sink is not None:
                        sink.write(row)
                    progress.advance(phase)
                budgets.append({
                    "frames": m, "finite": True, "n_batches": len(vids), "loss": gv.loss,
                    "A": A, "A_stderr": a_se, "A_ci95": list(a_ci) if a_ci else None,
                    "norm_vid": math.sqrt(sq), "sqnorm_vid": sq, "cos": A / (image_part["norm"] * math.sqrt(sq))
                    if image_part["norm"] > 0 and sq > 0 else None,
                    "q": q, "q_stderr": q_se, "q_ci95": list(q_ci) if q_ci else None,
                    "q_over_beta_sqnorm": q / (beta_img * sq) if beta_img > 0 and sq > 0 else None,
                    "q_vid": q_vid, "beta_vid": s_vid.to_dict(history=False) if s_vid else None,
                    "eta0": eta0, "eta_descent": 2 / b_vid if b_vid else None,
                    "noise_vid": noise_vid, "steps": steps,
                })
                progress.finish(phase)
            op_info = H_img.info()
    except KeyboardInterrupt:
        complete = False
    finally:
        if sink is not None:
            sink.close()

    summary = io._clean({
        "schema": SCHEMA,
        "gradprobe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "frames": frames,
        "lrs": lr_list,
        "settings": {
            "backend": op_info.get("backend"), "backend_requested": backend, "backend_tried": op_info.get("tried"),
            "fd_relative_step": op_info.get("fd_relative_step"), "method": method, "max_iter": max_iter, "tol": tol,
            "beta_vid": beta_vid, "trace_samples": trace_samples, "per_module": per_module,
            "n_params": selection.numel, "n_tensors": len(selection), "n_modules": len(mods),
            "include": include, "exclude": exclude, "roles": roles, "eval_mode": eval_mode, "seed": seed,
        },
        "image": image_part,
        "modules_beta": module_beta,
        "budgets": budgets,
        "warnings": warn_list,
        "meta": dict(meta or {}),
    })
    report = CurvatureReport(summary, pd.DataFrame(step_rows), pd.DataFrame(module_rows), pd.DataFrame(spectra_rows))
    if out_dir is not None:
        report.save(out_dir)
    if not complete:
        raise CurvatureInterrupted(report)
    return report


def _step_row(m: int, eta: float, A: float, sq: float, q: float, q_vid: float, beta_img: float,
              beta_vid: float | None, eta0: float | None, l_img0: float, l_vid0: float, l_img: float, l_vid: float,
              noise_img: float, noise_vid: float) -> dict[str, Any]:
    d_img, d_vid = l_img - l_img0, l_vid - l_vid0
    first = -eta * A
    pred = first + 0.5 * eta**2 * q
    slack = 0.5 * beta_img * eta**2 * sq
    vid_taylor = -eta * sq + 0.5 * eta**2 * q_vid
    vid_bound = -eta * (1 - beta_vid * eta / 2) * sq if beta_vid is not None else None
    resolved_img = abs(d_img) > 10 * noise_img
    return {
        "frames": m, "lr": eta,
        "d_img": d_img, "d_img_eq8": pred, "d_img_first_order": first,
        "d_img_lower_eq13": first - slack, "d_img_upper": first + slack,
        "eq8_rel_error": abs(d_img - pred) / abs(pred) if pred != 0 else None,
        "first_order_rel_error": abs(d_img - first) / abs(first) if first != 0 else None,
        "eq13_holds": bool(first - slack <= d_img <= first + slack),
        "image_loss_rose": bool(d_img > 0),
        "below_eta0": bool(eta0 is not None and eta < eta0),
        "d_vid": d_vid, "d_vid_second_order": vid_taylor, "d_vid_bound_eq14": vid_bound,
        "eq14_holds": bool(d_vid <= vid_bound) if vid_bound is not None else None,
        "noise_img": noise_img, "noise_vid": noise_vid,
        "resolved_img": bool(resolved_img), "resolved_vid": bool(abs(d_vid) > 10 * noise_vid),
    }
