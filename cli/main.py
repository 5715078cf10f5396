"""The ``gradprobe`` command line: thin commands that parse options and call the library."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="gradprobe",
    help="Gradient-conflict diagnostics for multimodal LLMs: image–video gradient alignment across frame budgets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _flag_type_hidden() -> None:
    """Flags take no value: show no type after them in --help (Typer's rich help prints ``<bool>``)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flag_type_hidden()


# options shared by the commands that load a model and data
FramesOpt = Annotated[str, typer.Option(help="Frame budgets m, comma-separated.")]
ImageDataOpt = Annotated[str | None, typer.Option(help="Image records: LLaVA or ShareGPT, JSON or JSONL.")]
VideoDataOpt = Annotated[str | None, typer.Option(help="Video records: LLaVA (incl. LLaVA-Video-178K) or ShareGPT, JSON or JSONL.")]
DataRootOpt = Annotated[str | None, typer.Option(help="Directory media paths are relative to (default: each data file's).")]
SamplerOpt = Annotated[str, typer.Option(help="Frame sampler Φ_m: uniform, static (one frame copied m times) or shuffled.")]
PixelPolicyOpt = Annotated[str, typer.Option(help="fixed (same per-frame resolution at every m) or total (a total-pixel budget, as qwen-vl-utils).")]
FramePixelsOpt = Annotated[int | None, typer.Option(help="Per-frame pixel cap (Qwen default 448×448).")]
TotalPixelsOpt = Annotated[int | None, typer.Option(help="Total video pixels for --pixel-policy total (Qwen default 24576 tokens' worth).")]
SkipBadOpt = Annotated[bool, typer.Option(help="Skip (and count) bad records instead of stopping.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Image minibatch size.")]
VideoBatchSizeOpt = Annotated[int, typer.Option(help="Video minibatch size.")]
IncludeOpt = Annotated[list[str] | None, typer.Option(help="Regex of parameter names to probe (repeatable).")]
ExcludeOpt = Annotated[list[str] | None, typer.Option(help="Regex of parameter names to skip (repeatable).")]
RolesOpt = Annotated[str | None, typer.Option(help="Parameter roles: vision,projector,language,head.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[str | None, typer.Option(help="Model dtype (default float32 on CPU, bfloat16 on GPU).")]
DeviceMapOpt = Annotated[str | None, typer.Option(help="from_pretrained device_map (e.g. auto) instead of --device.")]
AttnOpt = Annotated[str | None, typer.Option(help="from_pretrained attn_implementation: eager, sdpa, flash_attention_2.")]
CheckpointingOpt = Annotated[str, typer.Option(help="Activation checkpointing of every decoder layer and vision block in the measurement passes: auto (on when a video batch would not fit the free memory without it), on, off.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print summary.json to stdout instead of the table.")]
CacheOpt = Annotated[str | None, typer.Option(help="Toy cache directory (default $GRADPROBE_CACHE or ~/.cache/gradprobe).")]
ImageGroupsOpt = Annotated[int | None, typer.Option(help="G, image-group means kept (default: largest divisor of K ≤ 8).")]
RefDeviceOpt = Annotated[str, typer.Option(help="Where the reference (mean) gradients live: model (its device) or cpu (pinned).")]
RefDtypeOpt = Annotated[str | None, typer.Option(help="dtype of the reference gradients (default float32).")]
SketchOpt = Annotated[str, typer.Option(help="auto (exact rows when they fit a quarter of free memory, else a sketch), exact, or k buckets (e.g. 2^22).")]
SketchSeedOpt = Annotated[int, typer.Option(help="Seed of the sketch map (the same seed gives the same map in every run).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the bootstrap and of the run.")]
NBootOpt = Annotated[int, typer.Option(help="Bootstrap resamples.")]


def _as_option(msg: str, fn: Callable[..., Any]) -> str:
    """A message that opens with a Python parameter name (``n_boot: …``) names the option typed (``--n-boot: …``)."""
    import inspect
    import typing

    m = re.match(r"([a-z][a-z0-9_-]*):", msg)
    if m is None:
        return msg
    key = m.group(1).replace("-", "_")
    if key not in inspect.signature(fn).parameters:
        return msg
    hint = typing.get_type_hints(fn, include_extras=True).get(key)
    decls = [d for meta in getattr(hint, "__metadata__", ()) for d in getattr(meta, "param_decls", None) or ()]
    option = next((d for d in decls if d.startswith("--")), "--" + key.replace("_", "-"))
    return option + msg[len(m.group(1)):]


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register a command behind the one error boundary: bad input (any :class:`GradprobeError`) is one line
    on stderr naming the option the user typed, and exit code 2."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from gradprobe import GradprobeError

        try:
            return fn(*args, **kwargs)
        except GradprobeError as e:
            _fail(_as_option(str(e), fn))

    return app.command()(run)


def _rank0() -> bool:
    """This process speaks for the run: always in one process, rank 0 alone under torchrun."""
    from gradprobe.run import distributed_rank

    return distributed_rank() == 0


def _log(msg: str) -> None:
    """A progress line on stderr, never wrapped (paths stay whole); under torchrun from rank 0 only."""
    if _rank0():
        err.print(f"[dim]{msg}[/]", highlight=False, soft_wrap=True)


def _fail(msg: str, code: int = 2) -> None:
    if _rank0():  # under torchrun every rank meets the same bad input: one line, not one per rank
        err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _wide_console(width: int = 110) -> Console:
    """A terminal keeps its own width; piped output gets room for the whole table."""
    c = Console()
    return c if c.is_terminal else Console(width=width)


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "—"
    text = format(x + 0.0 if x == 0 else x, spec)  # never "-0"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _ci(c: Any) -> str:
    return "—" if not c else f"[{_fmt(c[0], '.3g')}, {_fmt(c[1], '.3g')}]"


def _change_cell(score: dict[str, Any]) -> str:
    """``first → last  change [CI]`` of one per-type score (see ``gradprobe.train.evaluate.type_changes``)."""
    c = score.get("change")
    tail = f"  {c['diff']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]" if c else ""
    return f"{score['first']:.2f} → {score['last']:.2f}{tail}"


def type_table(rows: list[tuple[str, dict[str, Any]]], title: str) -> Table | None:
    """Per question type: restricted and free accuracy first → last with the paired change and its 95% CI.

    ``rows``: (label, ``type_changes`` result) pairs, e.g. one per budget; video types are split into the
    records the budget can answer (m ≥ m_min) and those it cannot."""
    table = Table(title=title)
    for col in ("", "question type", "n", "restricted: first → last, change [95% CI]", "free: first → last"):
        table.add_column(col, justify="right")
    added = False
    for label, types in rows:
        for q, parts in types.items():
            for reach, e in parts.items():
                name = q if reach == "answerable" else f"{q} (m < m_min)"
                table.add_row(label, name, str(e["n"]), _change_cell(e["restricted"]),
                              f"{e['free']['first']:.2f} → {e['free']['last']:.2f}")
                added = True
    return table if added else None


def uncertainty_line(budgets: list[dict[str, Any]], image_batches: int | None) -> str | None:
    """Which sampling uncertainty dominates the intervals, and what narrows them."""
    shares = [b["var_share_image"] for b in budgets if b.get("var_share_image") is not None]
    if not shares:
        return None
    lo, hi = min(shares), max(shares)
    span = f"{lo:.0%}" if round(lo, 2) == round(hi, 2) else f"{lo:.0%}–{hi:.0%}"
    if sum(shares) / len(shares) >= 0.5:
        now = f", now {image_batches}" if image_batches else ""
        return (f"the image reference ḡ_img makes up {span} of the variance of A(m): more image batches "
                f"(--image-batches{now}) narrow the intervals most")
    return (f"the video batches make up {1 - hi:.0%}–{1 - lo:.0%} of the variance of A(m): more video batches "
            "(--video-batches) narrow the intervals most")


def sketch_line(sk: dict[str, Any] | None, budgets: list[dict[str, Any]]) -> str:
    """One line on how the inner products were computed."""
    if not sk:
        return "exact rows"
    if sk["mode"] == "exact":
        return f"exact rows ({sk['chosen']})"
    shares = [b["sketch_share"] for b in budgets if b.get("sketch_share") is not None]
    worst = f"; the sketch error makes up at most {max(shares):.1%} of a standard error" if shares else ""
    return f"sketched inner products, k={sk['k']:,}, seed {sk['seed']} ({sk['chosen']}){worst}"


def render_align(summary: dict[str, Any], console: Console) -> None:
    """Print the alignment table and the m* lines."""
    t = Table(title="image–video gradient alignment A(m) = ⟨ḡ_img, g_vid^(m)⟩", title_justify="left")
    for col in ("m", "n", "mean A", "95% CI (t)", "95% CI (boot)", "A<0", "cos", "‖Eg_img‖", "‖Eg_vid‖"):
        t.add_column(col, justify="right", no_wrap=True)
    for b in summary["budgets"]:
        if b.get("mean") is None:
            t.add_row(str(b["frames"]), str(b.get("n", 0)), "—", "—", "—", "—", "—", "—", "—")
            continue
        style = "red" if b["ci95_t"] and b["ci95_t"][1] < 0 else ("green" if b["ci95_t"] and b["ci95_t"][0] > 0 else "")
        t.add_row(
            str(b["frames"]), str(b["n"]), _fmt(b["mean"]), _ci(b["ci95_t"]), _ci(b["ci95_boot"]),
            _fmt(b["frac_negative"], ".2f"), _fmt(b["mean_cos"], ".3f"), _fmt(b["norm_img"]), _fmt(b["norm_vid"]),
            style=style,
        )
    console.print(t)
    s = summary["settings"]
    im = summary["image"]
    line = uncertainty_line(summary["budgets"], im.get("n_batches"))
    if line:
        console.print(line)
    if any(b.get("mean") is not None and (b.get("norm_img") is None or b.get("norm_vid") is None)
           for b in summary["budgets"]):
        console.print("[dim]‖Eg‖ —: the unbiased estimate of ‖E g‖² came out negative (the norm is below the "
                      "batch noise)[/]")
    ms = summary["m_star"]
    boot = ", ".join(f"{k}: {v:.2f}" for k, v in ms.get("bootstrap", {}).items() if v > 0)
    found = ms["empirical"] if ms["empirical"] is not None else "none in the grid"
    if ms.get("resolved", True):
        console.print(f"m* (smallest m with mean A(m) ≤ 0): [bold]{found}[/]"
                      f"   zero crossing (log2 interpolation): {_fmt(ms['zero_crossing'], '.3g')}")
    else:
        console.print(f"m*: [bold]not resolved[/] (from the means alone: {found}; {ms.get('resolution')})")
    if boot:
        console.print(f"bootstrap distribution of m*: {boot}")
    if ms.get("note"):
        console.print(f"[dim]{ms['note']}[/]")
    console.print(
        f"[dim]{im['n_batches']} image batches in {im['groups']} groups; {s['n_params']:,} parameters in "
        f"{s['n_modules']} modules; intervals carry image-group and video-batch uncertainty[/]"
    )
    console.print(f"[dim]{sketch_line(s.get('sketch'), summary['budgets'])}[/]")
    for w in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")


class _RichProgress:
    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
                          disable=not console.is_terminal or not _rank0())  # one bar, where someone watches
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _RichProgress:
        self.p.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.p.stop()

    def start(self, phase: str, total: int | None) -> None:
        self.tasks[phase] = self.p.add_task(phase, total=total)

    def advance(self, phase: str) -> None:
        self.p.advance(self.tasks[phase])

    def finish(self, phase: str) -> None:
        self.p.remove_task(self.tasks.pop(phase))


@contextlib.contextmanager
def _working() -> Iterator[_RichProgress]:
    """A command's work: gradprobe's progress bar on stderr, and whatever libraries print sent to stderr too,
    so that stdout carries the results only."""
    with contextlib.redirect_stdout(sys.stderr), _RichProgress(err) as progress:
        yield progress


@command
def align(
    frames: FramesOpt = "8,16,32,64",
    model: Annotated[list[str] | None, typer.Option(help="Model checkpoint directory or hub id (default: the toy); repeat or comma-separate for several checkpoints of one run.")] = None,
    image_data: ImageDataOpt = None,
    video_data: VideoDataOpt = None,
    data_root: DataRootOpt = None,
    sampler: SamplerOpt = "uniform",
    pixel_policy: PixelPolicyOpt = "fixed",
    frame_pixels: FramePixelsOpt = None,
    total_pixels: TotalPixelsOpt = None,
    skip_bad: SkipBadOpt = False,
    image_batches: Annotated[int, typer.Option(help="K, image minibatches for ḡ_img.")] = 8,
    video_batches: Annotated[int, typer.Option(help="J, video minibatches per budget (same clips at every m).")] = 12,
    batch_size: BatchSizeOpt = 16,
    video_batch_size: VideoBatchSizeOpt = 4,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    roles: RolesOpt = None,
    image_groups: ImageGroupsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    attn_implementation: AttnOpt = None,
    checkpointing: CheckpointingOpt = "auto",
    reference_device: RefDeviceOpt = "model",
    reference_dtype: RefDtypeOpt = None,
    sketch: SketchOpt = "auto",
    sketch_seed: SketchSeedOpt = 0,
    seed: SeedOpt = 0,
    n_boot: NBootOpt = 2000,
    out: Annotated[str, typer.Option(help="Output directory.")] = "gradprobe-align",
    json_out: JsonOpt = False,
    cache_dir: CacheOpt = None,
) -> None:
    """Measure A(m) = ⟨ḡ_img, g_vid^(m)⟩ per frame budget, with 95% CIs and the threshold m*."""
    from gradprobe import AlignInterrupted
    from gradprobe.run import AlignOptions, distributed_rank, run_align_checkpoints

    opts = _options(AlignOptions, locals())
    out_console = _wide_console() if not json_out else err
    try:
        with _working() as progress:
            reports = run_align_checkpoints(opts, progress=progress, log=_log)
    except AlignInterrupted as e:
        if distributed_rank() == 0:
            render_align(e.report.summary, out_console)
            err.print(f"[yellow]interrupted:[/] partial results written to {out}")
        raise typer.Exit(130) from None
    if distributed_rank() != 0:  # under torchrun every rank holds the same results: rank 0 prints them
        return
    several = len(reports) > 1
    if json_out:
        doc = {lab: r.summary for lab, r in reports} if several else reports[0][1].summary
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        for lab, r in reports:
            if several:
                out_console.print(f"[bold]{lab}[/] {r.summary['meta']['model']}")
            render_align(r.summary, out_console)
    if several:
        err.print(f"wrote {Path(out) / 'checkpoints.csv'} and one directory per checkpoint")
    else:
        err.print(f"wrote {Path(out) / 'summary.json'}, alignment.csv, modules.csv")


def _spec(s: dict[str, Any] | None) -> str:
    if not s:
        return "—"
    bottom = f", bottom {s['bottom']:.4g}" if s.get("bottom") is not None else ""
    conv = "" if s.get("converged") else ", not converged"
    return f"{s['beta']:.4g} (top {s['top']:.4g}{bottom}; {s['products']} HVPs{conv})"


def render_curvature(summary: dict[str, Any], console: Console) -> None:
    """Print the per-budget curvature table and the one-step lookahead table."""
    im, st = summary["image"], summary["settings"]
    if im:
        console.print(f"β_img = ‖H_img‖₂ ≈ {_spec(im.get('beta'))}   ‖g_img‖ = {_fmt(im.get('norm'))}   "
                      f"L_img = {_fmt(im.get('loss'))}")
        if im.get("trace"):
            tr = im["trace"]
            console.print(f"tr H_img ≈ {tr['mean']:.4g} 95% CI {_ci(tr.get('ci95'))} ({len(tr['samples'])} Hutchinson vectors)")
    t = Table(title="curvature per frame budget (A: CI over video batches; q = g_vidᵀH_img g_vid: CI over image batches)",
              title_justify="left")
    for col in ("m", "A", "95% CI", "cos", "‖g_vid‖", "q", "95% CI ", "q/(β‖g‖²)", "β_vid", "η0 (Eq. 11)", "2/β_vid"):
        t.add_column(col, justify="right", no_wrap=True)
    for b in summary["budgets"]:
        if not b.get("finite", True) or "A" not in b:
            t.add_row(str(b["frames"]), *["—"] * 10)
            continue
        t.add_row(str(b["frames"]), _fmt(b["A"]), _ci(b["A_ci95"]), _fmt(b["cos"], ".3f"), _fmt(b["norm_vid"]),
                  _fmt(b["q"]), _ci(b["q_ci95"]), _fmt(b["q_over_beta_sqnorm"], ".3f"),
                  _fmt((b.get("beta_vid") or {}).get("beta")), _fmt(b["eta0"], ".3g") if b["eta0"] else "none (A ≥ 0)",
                  _fmt(b["eta_descent"], ".3g"), style="red" if b["A"] < 0 else "")
    console.print(t)
    lt = Table(title="one step θ⁺ = θ − η g_vid: predicted vs actual loss change", title_justify="left")
    for col in ("m", "η", "ΔL_img", "Eq. 8", "rel. err", "Eq. 13 range", "ΔL_vid", "2nd order", "Eq. 14 bound", "holds"):
        lt.add_column(col, justify="right", no_wrap=True)
    for b in summary["budgets"]:
        for r in b.get("steps", []):
            holds = ("13✓" if r["eq13_holds"] else "13✗") + (" 14✓" if r["eq14_holds"] else " 14✗" if r["eq14_holds"] is not None else "")
            lt.add_row(str(r["frames"]), f"{r['lr']:.0e}", _fmt(r["d_img"], ".4g") + ("" if r["resolved_img"] else "*"),
                       _fmt(r["d_img_eq8"], ".4g"), _fmt(r["eq8_rel_error"], ".2g"),
                       f"[{r['d_img_lower_eq13']:.3g}, {r['d_img_upper']:.3g}]",
                       _fmt(r["d_vid"], ".4g") + ("" if r["resolved_vid"] else "*"), _fmt(r["d_vid_second_order"], ".4g"),
                       _fmt(r["d_vid_bound_eq14"], ".4g"), holds)
    console.print(lt)
    tried = st.get("backend_tried") or {}
    note = f"; passed over: {', '.join(tried)}" if tried else ""
    console.print(f"[dim]HVP backend {st.get('backend')} (requested {st['backend_requested']}{note}); "
                  f"{st['method']} to tol {st['tol']:g}; {st['n_params']:,} parameters; "
                  f"{im.get('n_batches', 0)} image batches; * = change within 10× the loss noise[/]")
    for w in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")


#: command parameters that shape the output only, not the run
CLI_ONLY = frozenset({"json_out"})


def _options(cls: Any, values: dict[str, Any]) -> Any:
    """A command's parameters as the options dataclass ``cls``: every field from the parameter of its name
    (unset repeatable options as empty lists, no model as None). A field without a parameter, or a
    parameter without a field, is a programming error (``tests/test_cli.py`` checks every command)."""
    import dataclasses
    import inspect

    caller = inspect.currentframe().f_back.f_code  # type: ignore[union-attr]
    fields = {f.name for f in dataclasses.fields(cls)}
    params = set(caller.co_varnames[: caller.co_argcount + caller.co_kwonlyargcount]) - CLI_ONLY
    if fields != params:
        raise TypeError(f"{cls.__name__} and the command disagree: fields without an option {sorted(fields - params)}, "
                        f"options without a field {sorted(params - fields)}")
    kw = {name: values[name] for name in fields}
    for name in ("include", "exclude"):
        if name in kw:
            kw[name] = kw[name] or []
    if "model" in kw:
        kw["model"] = kw["model"] or None
    return cls(**kw)


def _execute(run: Any, opts: Any, render: Any, json_out: bool, width: int = 150) -> Any:
    """Run one command with a progress bar: one-line errors (exit 2), the partial table on Ctrl-C (exit 130),
    then the table, or summary.json on stdout with ``--json``."""
    from gradprobe.errors import RunInterrupted

    out_console = _wide_console(width) if not json_out else err
    try:
        with _working() as progress:
            report = run(opts, progress=progress, log=_log)
    except RunInterrupted as e:
        if _rank0():
            render(e.report.summary, out_console)
            err.print(f"[yellow]interrupted:[/] partial results written to {opts.out}")
        raise typer.Exit(130) from None
    if not _rank0():  # under torchrun every rank holds the same results: rank 0 prints them
        raise typer.Exit(0)
    if json_out:
        sys.stdout.write(json.dumps(report.summary, indent=2) + "\n")
    else:
        render(report.summary, out_console)
    return report


@command
def curvature(
    frames: FramesOpt = "8,16,32,64",
    lr: Annotated[str, typer.Option(help="Step sizes η, comma-separated, for Eq. 8/11/14 and the one-step lookahead.")] = "1e-5",
    model: Annotated[str | None, typer.Option(help="Model checkpoint directory or hub id (default: the toy).")] = None,
    image_data: ImageDataOpt = None,
    video_data: VideoDataOpt = None,
    data_root: DataRootOpt = None,
    backend: Annotated[str, typer.Option(help="HVP backend: auto, double_backward, forward_over_reverse, finite_difference.")] = "auto",
    method: Annotated[str, typer.Option(help="β by lanczos or power (iteration).")] = "lanczos",
    max_iter: Annotated[int, typer.Option(help="Most Hessian-vector products per eigenvalue run.")] = 100,
    tol: Annotated[float, typer.Option(help="Relative tolerance of the eigenvalue runs.")] = 1e-3,
    beta_vid: Annotated[bool, typer.Option(help="Estimate β_vid^(m) for Eq. 14 (one eigenvalue run per budget).")] = True,
    trace_samples: Annotated[int, typer.Option(help="Hutchinson vectors for tr H_img (0: skip).")] = 0,
    per_module: Annotated[bool, typer.Option(help="Also estimate β_img of each module's diagonal Hessian block.")] = False,
    fd_step: Annotated[float | None, typer.Option(help="Relative step of finite_difference (default eps^(1/3) of the dtype).")] = None,
    image_batches: Annotated[int, typer.Option(help="K, image minibatches of L_img.")] = 4,
    video_batches: Annotated[int, typer.Option(help="J, video minibatches per budget (same clips at every m).")] = 4,
    batch_size: BatchSizeOpt = 16,
    video_batch_size: VideoBatchSizeOpt = 4,
    sampler: SamplerOpt = "uniform",
    pixel_policy: PixelPolicyOpt = "fixed",
    frame_pixels: FramePixelsOpt = None,
    total_pixels: TotalPixelsOpt = None,
    skip_bad: SkipBadOpt = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    roles: RolesOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    attn_implementation: AttnOpt = None,
    checkpointing: CheckpointingOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the start and probe vectors.")] = 0,
    out: Annotated[str, typer.Option(help="Output directory.")] = "gradprobe-curvature",
    json_out: JsonOpt = False,
    cache_dir: CacheOpt = None,
) -> None:
    """Hessian bounds per frame budget: β, q = g_vidᵀH_img g_vid, η0 (Eq. 11) and a one-step lookahead vs Eq. 8 and 14."""
    from gradprobe.run import CurvatureOptions, run_curvature

    opts = _options(CurvatureOptions, locals())
    _execute(run_curvature, opts, render_curvature, json_out)
    err.print(f"wrote {Path(out) / 'summary.json'}, lookahead.csv, curvature_modules.csv, spectra.csv")


def render_decompose(summary: dict[str, Any], console: Console) -> None:
    """Print the per-budget decomposition, ρ_sh and ρ_tmp, the assumption checks and both m*."""
    if not summary.get("budgets"):
        console.print(summary.get("note", "nothing to decompose"))
        return
    t = Table(title="A(m) = ρ_sh − α(m) ρ_tmp + ⟨g_img, ε(m)⟩ (Eq. 16–20); 95% CIs", title_justify="left")
    for col in ("m", "A measured", "95% CI", "ρ_sh", "−α ρ_tmp", "95% CI ", "predicted", "residual", "α(m)",
                "95% CI  ", "Var ε(m)"):
        t.add_column(col, justify="right", no_wrap=True)
    for b in summary["budgets"]:
        t.add_row(str(b["frames"]), _fmt(b["A"]), _ci(b["A_ci95_t"]), _fmt(b["rho_sh"]), _fmt(b["contrib_tmp"]),
                  _ci(b["contrib_tmp_ci95"]), _fmt(b["A_pred"]), _fmt(b["residual"]), _fmt(b["alpha"]),
                  _ci(b["alpha_ci95"]), _fmt(b["var_eps"]), style="red" if b["A"] < 0 else "")
    console.print(t)
    sh, tm, td = summary["rho_sh"], summary["rho_tmp"], summary["tmp_direction"]
    console.print(f"ρ_sh = {_fmt(sh['value'])} 95% CI {_ci(sh['ci95'])}   ({summary['shared']['label']})")
    if td["resolved"]:
        share = (f"ĝ_tmp explains {td['explained']:.0%} of Σ‖d_m‖²" if td["explained"] is not None
                 else "its share of Σ‖d_m‖² is undefined (the estimated Σ‖d_m‖² is not positive)")
        console.print(f"ρ_tmp = {_fmt(tm['value'])} 95% CI {_ci(tm['ci95'])}   cos(g_img, ĝ_tmp) = "
                      f"{_fmt(tm['cos_img_tmp'], '.3f')}   {share}")
    else:
        console.print("ρ_tmp undefined: no temporal direction (the budgets' mean gradients equal the shared one)")
    ct = Table(title="assumption checks", title_justify="left")
    for col in ("check", "claim", "statistic", "value", "95% CI", "verdict"):
        ct.add_column(col, no_wrap=col != "claim")
    colour = {"held": "green", "violated": "red", "inconclusive": "yellow"}
    for c in summary["checks"]:
        ct.add_row(c["check"], c["claim"], c["statistic"], _fmt(c["value"]), _ci(c["ci95"]),
                   f"[{colour[c['verdict']]}]{c['verdict']}[/]")
    console.print(ct)
    ms = summary["m_star"]
    for key, name in (("model", "model-based, Eq. 22"), ("empirical", "empirical, first mean A(m) ≤ 0")):
        s = ms[key]
        boot = ", ".join(f"{k}: {v:.2f}" for k, v in s.get("bootstrap", {}).items() if v > 0)
        console.print(f"m* ({name}): [bold]{s['value'] if s['value'] is not None else 'none in the grid'}[/]"
                      + (f"   bootstrap: {boot}" if boot else ""))
        if s.get("note"):
            console.print(f"[dim]  {s['note']}[/]")
    st, v = summary["settings"], summary["video"]
    console.print(f"[dim]{summary['image']['n_batches']} image batches in {summary['image']['groups']} groups; "
                  f"{v['batches_used']} video batches in {v['groups']} groups; tolerance τ = "
                  f"{st['tolerance']:g} × scale; {st['n_params']:,} parameters[/]")
    for w in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")


@command
def decompose(
    frames: FramesOpt = "2,8,16,32,64",
    shared: Annotated[str, typer.Option(help="The variant that defines g_sh: smallest (the smallest budget the model accepts), static or shuffled (that sampler at every budget).")] = "smallest",
    model: Annotated[str | None, typer.Option(help="Model checkpoint directory or hub id (default: the toy).")] = None,
    image_data: ImageDataOpt = None,
    video_data: VideoDataOpt = None,
    data_root: DataRootOpt = None,
    sampler: SamplerOpt = "uniform",
    pixel_policy: PixelPolicyOpt = "fixed",
    frame_pixels: FramePixelsOpt = None,
    total_pixels: TotalPixelsOpt = None,
    skip_bad: SkipBadOpt = False,
    image_batches: Annotated[int, typer.Option(help="K, image minibatches for g_img.")] = 16,
    video_batches: Annotated[int, typer.Option(help="J, video minibatches (the same clips at every m and in the shared variant).")] = 24,
    batch_size: BatchSizeOpt = 16,
    video_batch_size: VideoBatchSizeOpt = 4,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    roles: RolesOpt = None,
    image_groups: ImageGroupsOpt = None,
    video_groups: Annotated[int | None, typer.Option(help="H, video groups whose mean gradients are kept per variant (default: largest divisor of J in 2..12).")] = None,
    tolerance: Annotated[float, typer.Option(help="Relative tolerance τ of the checks (fraction of each quantity's scale).")] = 0.1,
    redundant_from: Annotated[int | None, typer.Option(help="Check Var ε(m) non-decreasing only for m ≥ this.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    attn_implementation: AttnOpt = None,
    checkpointing: CheckpointingOpt = "auto",
    reference_device: RefDeviceOpt = "model",
    reference_dtype: RefDtypeOpt = None,
    sketch: SketchOpt = "auto",
    sketch_seed: SketchSeedOpt = 0,
    seed: SeedOpt = 0,
    n_boot: NBootOpt = 2000,
    out: Annotated[str, typer.Option(help="Output directory.")] = "gradprobe-decompose",
    json_out: JsonOpt = False,
    cache_dir: CacheOpt = None,
) -> None:
    """The α(m) decomposition g_vid^(m) = g_sh + α(m) g_tmp + ε(m): ρ_sh, ρ_tmp, Assumptions 3–5 and both m*."""
    from gradprobe.run import DecomposeOptions, run_decompose

    opts = _options(DecomposeOptions, locals())
    _execute(run_decompose, opts, render_decompose, json_out)
    err.print(f"wrote {Path(out) / 'summary.json'}, decompose.csv, decompose_checks.csv, decompose_batches.csv")


@command
def plot(
    out_dir: Annotated[str, typer.Argument(help="An output directory of `gradprobe align`, `sft` or `trap`.")],
) -> None:
    """Draw the plots of saved outputs (PNG): alignment curve and module heatmap, training trajectory, or trap curves."""
    from gradprobe.report.plots import plot_dir

    paths = plot_dir(out_dir)
    for p in paths:
        Console().print(f"wrote {p}")


@command
def sft(
    out: Annotated[str, typer.Option(help="Output directory: checkpoints, trajectory, final model.")] = "gradprobe-sft",
    frames: Annotated[int, typer.Option(help="Frame budget m (with --manifest: for clips it does not list).")] = 8,
    manifest: Annotated[str | None, typer.Option(help='Per-sample budgets: JSONL lines {"id", "frames"}.')] = None,
    sampler: SamplerOpt = "uniform",
    keep_clips: Annotated[bool | None, typer.Option("--keep-clips/--no-keep-clips", help="Keep decoded training clips in memory (faster from the second epoch; memory: clips × m × frame bytes). Default: on for the toy, off for --model.")] = None,
    model: Annotated[str | None, typer.Option(help="Model checkpoint directory (default: the toy).")] = None,
    video_data: Annotated[str | None, typer.Option(help="JSONL of video training records.")] = None,
    image_probe: Annotated[str | None, typer.Option(help="JSONL of held-out image records for the probe.")] = None,
    data_root: Annotated[str | None, typer.Option(help="Directory media paths are relative to.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 6000,
    batch_size: Annotated[int, typer.Option(help="Video batch size.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay).")] = 5e-4,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters on the language model (peft).")] = False,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank r (alpha = 2r).")] = 8,
    probe_every: Annotated[int, typer.Option(help="Probe alignment every N optimizer steps.")] = 500,
    guard: Annotated[str, typer.Option(help="observe, warn, stop or project.")] = "observe",
    probe_frames: Annotated[str | None, typer.Option(help="Also track A(m) and m* at these budgets along the run, e.g. 2,8,16.")] = None,
    video_probe: Annotated[str | None, typer.Option(help="JSONL of held-out video records for --probe-frames (toy: its probe split).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate held-out accuracy every N steps (default: at the start and the end only).")] = None,
    eval_image_data: Annotated[str | None, typer.Option(help="JSONL of held-out image records to score (toy: its eval split).")] = None,
    eval_video_data: Annotated[str | None, typer.Option(help="JSONL of held-out video records to score.")] = None,
    eval_images: Annotated[int, typer.Option(help="Held-out image records scored (the first N).")] = 300,
    eval_videos: Annotated[int, typer.Option(help="Held-out video records scored (the first N; 100 per question type on the toy).")] = 400,
    probe_batches: Annotated[int, typer.Option(help="Image probe batches (the first ones of --image-probe).")] = 4,
    probe_batch_size: Annotated[int, typer.Option(help="Image probe batch size.")] = 8,
    video_probe_batches: Annotated[int, typer.Option(help="Video probe batches per budget for --probe-frames (of --batch-size).")] = 3,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")] = False,
    cache_dir: Annotated[str | None, typer.Option(help="Toy cache directory.")] = None,
) -> None:
    """Video-SFT with transformers' Trainer, watching update–image-probe alignment along the run."""
    from gradprobe.sft import SFTOptions, run_sft

    opts = _options(SFTOptions, locals())
    with _working() as progress:
        summary = run_sft(opts, log=_log, progress=progress)
    console = _wide_console()
    for kind in ("video", "image"):
        table = type_table([(kind, summary.get("types", {}).get(kind, {}))],
                           f"Held-out {kind} accuracy per question type, first → last evaluation")
        if table is not None:
            console.print(table)
    probes, guard = summary["probes"], summary["guard"]
    fired = ", ".join(f"{kind} {n}" for kind, n in guard["fired"].items())
    console.print(
        f"trained {summary['steps']} steps (loss {summary['train_loss']:.4g}); {probes} alignment "
        f"probe{'' if probes == 1 else 's'} in {summary['trajectory']}; guard {guard['action']} (fired: {fired})"
    )


@command
def trap(
    out: Annotated[str, typer.Option(help="Output directory: one frames-<m> run per budget and trap_summary.json.")] = "gradprobe-trap",
    frames: Annotated[str, typer.Option(help="Frame budgets, one Video-SFT run each.")] = "8,16,32,64",
    steps: Annotated[int, typer.Option(help="Optimizer steps per run.")] = 6000,
    batch_size: Annotated[int, typer.Option(help="Video batch size.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay).")] = 5e-4,
    probe_every: Annotated[int, typer.Option(help="Probe alignment every N steps.")] = 500,
    eval_every: Annotated[int | None, typer.Option(help="Score held-out accuracy every N steps (default: at the start and the end only).")] = None,
    eval_images: Annotated[int, typer.Option(help="Held-out images scored.")] = 300,
    eval_videos: Annotated[int, typer.Option(help="Held-out videos scored (100 per question type).")] = 400,
    samplers: Annotated[str, typer.Option(help="Frame samplers, one run per budget each: uniform, and the controls static (one frame copied m times) and shuffled.")] = "uniform",
    control_frames: Annotated[str | None, typer.Option(help="Budgets the control samplers run at (default: every --frames budget).")] = None,
    hybrid: Annotated[str | None, typer.Option(help="Add Hybrid-Frame arms: per-clip budgets from these gradprobe budget methods (e.g. redundancy,sufficiency), scored at the largest budget.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    cache_dir: Annotated[str | None, typer.Option(help="Toy cache directory.")] = None,
) -> None:
    """The temporal-trap experiment on the toy: Video-SFT at each budget, image and video accuracy along each run."""
    from gradprobe.experiments.trap import TrapOptions, run_trap

    opts = _options(TrapOptions, locals())
    with _working() as progress:
        summary = run_trap(opts, log=_log, progress=progress)
    table = Table(title=f"Video-SFT at each budget ({steps} steps): accuracy first → last, change with 95% CI")
    for col in ("m", "sampler", "frames/clip", "image (free)", "image (restricted)", "video (free)", "video (restricted)",
                "mean cos"):
        table.add_column(col, justify="right")
    for b in summary["budgets"]:
        cells = [str(b["frames"]), b["sampler"], f"{b['mean_frames']:.1f}"]
        for k in ("image_free", "image_restricted", "video_free", "video_restricted"):
            v, c = b[k], b[k].get("change")
            ci = f" [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c else ""
            cells.append(f"{v['first']:.3f} → {v['last']:.3f}{ci}")
        a = b.get("alignment")
        cells.append(f"{a['mean_cos']:+.3f}" if a else "-")
        table.add_row(*cells)
    console = _wide_console(140)
    console.print(table)
    per_type = type_table([(f"m={b['frames']}" + ("" if b["sampler"] == "uniform" else f" {b['sampler']}"),
                            b.get("video_types", {})) for b in summary["budgets"]],
                          "Video accuracy per question type at each budget, first → last evaluation")
    if per_type is not None:
        console.print(per_type)
    console.print(f"wrote {Path(out) / 'trap_summary.json'}")


@command
def budget(
    out: Annotated[str, typer.Option(help="Output directory: manifest.jsonl, budget_settings.json, budget_summary.json.")] = "gradprobe-budget",
    frames: Annotated[str, typer.Option(help="The budgets to choose from.")] = "8,16,32,64",
    method: Annotated[str, typer.Option(help="Allocation method: redundancy (frame embeddings cover the clip), sufficiency (the answer loss holds), gradient (the clip's gradient keeps its direction) or judge (a VLM reads the question).")] = "redundancy",
    tolerance: Annotated[float | None, typer.Option(help="Largest distance to the largest budget that still counts as enough (default: the method's).")] = None,
    model: Annotated[str | None, typer.Option(help="Model checkpoint directory (default: the toy).")] = None,
    video_data: Annotated[str | None, typer.Option(help="Video records to allocate (default: the toy's training clips).")] = None,
    data_root: Annotated[str | None, typer.Option(help="Directory media paths are relative to.")] = None,
    embedder: Annotated[str | None, typer.Option(help="redundancy: a local Hugging Face image model directory (e.g. DINOv2) instead of the model's vision tower.")] = None,
    judge: Annotated[str | None, typer.Option(help="judge: a local generative VLM checkpoint of a supported family (default: --model).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N records.")] = None,
    score: Annotated[bool, typer.Option(help="Score the budgets against the records' m_min (ShapesWorld) and print the table.")] = False,
    alignment: Annotated[int, typer.Option(help="Eq. 28 per clip: ⟨ḡ_img, g_clip⟩ at the allocated budget vs the largest, for the first N clips allocated below it (0: skip).")] = 0,
    export: Annotated[tuple[str, str] | None, typer.Option(
        metavar="FORMAT DIR",
        help="Also write the clips for a training stack (llamafactory or swift), each as the list of its frames at its budget.",
    )] = None,
    image_data: Annotated[str | None, typer.Option(help="--alignment: image records for ḡ_img (default: the toy's probe images; the first 32, in batches of 8).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    checkpointing: CheckpointingOpt = "auto",
    cache_dir: Annotated[str | None, typer.Option(help="Toy cache directory.")] = None,
) -> None:
    """Per-sample frame budgets (Hybrid-Frame): a manifest for `gradprobe sft --manifest`, optionally scored against m_min."""
    from gradprobe.budget import BudgetOptions, run_budget

    opts = _options(BudgetOptions, locals())
    with _working() as progress:
        summary = run_budget(opts, log=_log, progress=progress)
    console = _wide_console(120)
    table = Table(title=f"Budgets by {summary['method']} (tolerance {summary['tolerance']:g})")
    for col in ("frames", "clips", "share"):
        table.add_column(col, justify="right")
    for m, c in summary["counts"].items():
        table.add_row(m, str(c), f"{c / summary['n']:.1%}" if summary["n"] else "-")
    console.print(table)
    saved = summary["tokens_saved_fraction"]
    console.print(f"score: {summary['statistic']}")
    if "parsed_fraction" in summary:
        console.print(f"a number was found in {summary['parsed_fraction']:.0%} of the judge's replies and read as a budget "
                      "(the rest: the largest); the replies are in the manifest ('reply'): check that they answer the prompt")
    console.print(f"mean frames {summary['mean_frames']:.2f}; visual tokens {summary['visual_tokens']:,} against "
                  f"{summary['visual_tokens_at_largest']:,} at the largest budget"
                  + (f" ({saved:.1%} saved)" if saved is not None else ""))
    if "score" in summary:
        sc = summary["score"]
        st = Table(title="Against m_min (target: the smallest budget of the grid ≥ m_min)")
        for col in ("budgets", "question type", "n", "exact", "under (evidence lost)", "over", "mean frames"):
            st.add_column(col, justify="left" if col in ("budgets", "question type") else "right")
        groups = [(summary["method"], sc["manifest"]), *[(f"uniform {m}", t) for m, t in sc["uniform"].items()]]
        for label, tab in groups:
            for i, (q, e) in enumerate(tab.items()):
                st.add_row(label if i == 0 else "", q, str(e["n"]), f"{e['exact']:.2f}", f"{e['under']:.2f}",
                           f"{e['over']:.2f}", f"{e['mean_frames']:.1f}", end_section=i == len(tab) - 1)
        console.print(st)
    if "alignment" in summary:
        al = summary["alignment"]
        d = al["A_allocated"]
        diff = al["difference"]
        ci = f" [{diff['ci95'][0]:+.4g}, {diff['ci95'][1]:+.4g}]" if diff["ci95"] else ""
        console.print(f"Eq. 28 over {al['n']} clips below the largest budget: ⟨ḡ_img, g⟩ at the allocated budget "
                      f"{d['mean']:+.4g}, at the largest {al['A_largest']['mean']:+.4g}; difference "
                      f"{diff['mean']:+.4g}{ci} (95% CI over clips)" if al["n"] else
                      "Eq. 28: no clip is allocated below the largest budget")
    console.print(f"wrote {Path(out) / 'manifest.jsonl'}")


@command
def models() -> None:
    """List the supported model families, their HF architecture strings and frame-budget rules."""
    from gradprobe.models.registry import families

    table = Table(title="Supported model families (--model DIR: found by config.json's architectures)")
    for col in ("family", "architectures", "frame budgets", "note"):
        table.add_column(col)
    for f in families():
        table.add_row(f.name, ", ".join(f.architectures), f.frames, f.note)
    _wide_console(160).print(table)


@command
def toy(
    cache_dir: Annotated[str | None, typer.Option(help="Cache directory (default $GRADPROBE_CACHE or ~/.cache/gradprobe).")] = None,
    steps: Annotated[int, typer.Option(help="Image-stage training steps.")] = 900,
    train_images: Annotated[int, typer.Option(help="Training images.")] = 4000,
    seed: Annotated[int, typer.Option(help="Seed of data, initialisation and training.")] = 0,
    rebuild: Annotated[bool, typer.Option(help="Build again even if cached.")] = False,
    export: Annotated[tuple[str, str] | None, typer.Option(
        metavar="FORMAT DIR",
        help="Also write the toy's data for a training stack: llamafactory (with dataset_info.json) or swift.",
    )] = None,
) -> None:
    """Build (or find) the cached toy model and print its held-out image accuracy."""
    from gradprobe.data.export import FORMATS
    from gradprobe.toybox import ToySpec, ensure_toy

    if export is not None:
        if export[0] not in FORMATS:
            _fail(f"--export: unknown format {export[0]!r}; use one of {', '.join(FORMATS)}")
        if Path(export[1]).exists() and not Path(export[1]).is_dir():
            _fail(f"--export: {export[1]} exists and is not a directory")
    spec = ToySpec(seed=seed, steps=steps, n_train_images=train_images)
    with _working() as progress:
        t = ensure_toy(spec, cache_dir, rebuild=rebuild, log=_log,
                       progress=progress)
        written = t.export(*export) if export is not None else {}
    acc = t.info["image_accuracy"]
    init = t.info["initial_image_accuracy"]
    c = Console(soft_wrap=True)  # paths stay whole
    c.print(f"toy model: {t.model_dir}")
    c.print(f"data:      {t.data_dir}")
    c.print(
        f"held-out image accuracy ({acc['n']} questions): free {acc['free']:.3f}, answer-restricted "
        f"{acc['restricted']:.3f} (before training: {init['free']:.3f} / {init['restricted']:.3f}; "
        f"majority answer {acc['majority']:.3f})"
    )
    if written:
        c.print(f"{export[0]} data:  {Path(export[1])} ({', '.join(written)})")


def _one_line_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                      line: str | None = None) -> None:
    """Warnings as one line on stderr; gradprobe's own are part of the results (table, summary.json)."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parents[1] / "gradprobe") or not _rank0():
        return
    text = str(message).strip().splitlines()
    err.print(f"[yellow]warning:[/] {text[0] if text else category.__name__}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point: one-line errors for bad input (exit code 2) and warnings; stdout holds
    results only (what libraries print goes to stderr); no library progress bars but gradprobe's own."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = _one_line_warning
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
