"""ShapesWorld: a procedurally generated image and video world with known answers.

Images (PNG) hold 1–4 small coloured shapes on a grey canvas; their questions need
fine spatial detail (colour, shape, existence, count, left/right position), like
MME's perception subtasks. Videos (MP4, 64 frames of 32 × 32 pixels: drawn at the images' scale and
stored at half resolution) mix four question kinds that
need different temporal budgets:

* ``static`` — an attribute visible in every frame (one frame suffices);
* ``motion`` — which way a shape crosses the canvas (within 16–24 frames), of the two directions of the axis
  the question names (two frames);
* ``order`` — which of two colours appears first: the first shape is alone for w frames (w in 4–16), then
  both are on the canvas for w frames, then the second is alone for w frames. Each colour is on the canvas
  for as many frames, so which colours a set of frames shows does not tell the answer; the order of two
  frames from different phases does;
* ``blink`` — how many times (1–3) a small light blinks: lit 12 frames in all, in equal blinks, so how many
  lit frames a clip has does not tell the count; the frames must show each blink as a separate run (dense
  sampling).

Every answer is a word the image questions also use (colours, shapes, numbers, yes/no, left/right) or, for
vertical motion, up/down, so a model cannot gain accuracy on video questions by learning new answer words.

Each video record carries ``m_min``, the smallest budget m for which the uniform
sampler Φ_m (:func:`gradprobe.data.sampling.uniform_indices`) shows enough to
answer, computed by brute force from the generated timeline. Records are
LLaVA-style JSONL lines; each also carries ``qtype`` and ``choices`` (the valid
answers of its question type, for answer-restricted scoring). The user turn opens
with the medium's tag (``<image>`` or ``<video>``), as LLaMA-Factory and ms-swift expect. Everything is
deterministic by seed.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gradprobe.data.sampling import uniform_indices
from gradprobe.data.video import write_mp4

SIZE = 64
VIDEO_FRAMES = 64
#: clips are drawn at the images' scale and stored at half resolution (a 2 × 2 box filter): 32 × 32 frames
#: hold a quarter of the visual tokens, so Video-SFT at 64 frames fits the CPU budget
VIDEO_SIZE = SIZE // 2
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (120, 120, 120)
NUMBERS = ("1", "2", "3", "4")
YESNO = ("yes", "no")
SIDES = ("left", "right")
DIRECTIONS = ("left", "right", "up", "down")

IMAGE_QTYPES = ("colour", "exist", "count", "position")
VIDEO_QTYPES = ("static", "motion", "order", "blink")
#: frames the blink clips' light is lit, whatever the number of blinks (1, 2 or 3: 12, 6 or 4 frames each)
BLINK_LIT = 12


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float  # centre, pixels
    y: float
    r: float  # half-size, pixels


def draw(shapes: list[Shape], size: int = SIZE, light: bool = False) -> np.ndarray:
    """Render shapes (and optionally the blinking light, top-left corner) to (H, W, 3) uint8."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in shapes:
        c = COLOURS[s.colour]
        box = [s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r]
        if s.kind == "circle":
            d.ellipse(box, fill=c)
        elif s.kind == "square":
            d.rectangle(box, fill=c)
        else:
            d.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=c)
    if light:
        d.rectangle([1, 1, 6, 6], fill=(255, 255, 255))
    return np.asarray(img, dtype=np.uint8)


def half_size(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 frames at half resolution, each output pixel the mean of a 2 × 2 block."""
    T, H, W, C = frames.shape
    blocks = frames.astype(np.float32).reshape(T, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
    return np.round(blocks).astype(np.uint8)


def _place(rng: np.random.Generator, n: int, r_lo: float = 5, r_hi: float = 8) -> list[tuple[float, float, float]]:
    """n non-overlapping (x, y, r) placements inside the canvas."""
    out: list[tuple[float, float, float]] = []
    for _ in range(1000):
        if len(out) == n:
            break
        r = float(rng.uniform(r_lo, r_hi))
        x, y = (float(v) for v in rng.uniform(r + 9, SIZE - r - 2, size=2))
        if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 2) ** 2 for a, b, c in out):
            out.append((x, y, r))
    return out


def _record(rid: str, key: str, path: str, question: str, answer: str, qtype: str, choices: tuple[str, ...],
            **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        key: path,
        "conversations": [
            {"from": "human", "value": f"<{key}>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "qtype": qtype,
        "choices": list(choices),
        **extra,
    }


def image_sample(rng: np.random.Generator) -> tuple[np.ndarray, str, str, str, tuple[str, ...]]:
    """One image with a question: returns (pixels, question, answer, qtype, choices)."""
    n = int(rng.integers(1, 5))
    spots = _place(rng, n)
    shapes = [Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), x, y, r) for x, y, r in spots]
    qtype = str(rng.choice(IMAGE_QTYPES))
    if qtype == "colour":
        s = shapes[int(rng.integers(len(shapes)))]
        same = [t for t in shapes if t.kind == s.kind]
        if len(same) == 1:
            return draw(shapes), f"what colour is the {s.kind} ?", s.colour, qtype, tuple(COLOURS)
        qtype = "exist"
    if qtype == "exist":
        if rng.random() < 0.5:
            s = shapes[int(rng.integers(len(shapes)))]
            kind, colour = s.kind, s.colour
        else:
            kind, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        yes = any(t.kind == kind and t.colour == colour for t in shapes)
        return draw(shapes), f"is there a {colour} {kind} ?", "yes" if yes else "no", qtype, YESNO
    if qtype == "count":
        return draw(shapes), "how many shapes are there ?", str(len(shapes)), qtype, NUMBERS
    # position: a shape unique by colour and kind, left or right half
    s = shapes[int(rng.integers(len(shapes)))]
    if sum(t.kind == s.kind and t.colour == s.colour for t in shapes) > 1 or abs(s.x - SIZE / 2) < 4:
        return draw(shapes), "how many shapes are there ?", str(len(shapes)), "count", NUMBERS
    side = "left" if s.x < SIZE / 2 else "right"
    return draw(shapes), f"is the {s.colour} {s.kind} on the left or the right ?", side, "position", SIDES


def _m_min(answerable: callable[[np.ndarray], bool], total: int = VIDEO_FRAMES) -> int:
    """Smallest m whose uniform sample of frame indices makes the question answerable."""
    for m in range(1, 4 * total + 1):
        if answerable(uniform_indices(total, m)):
            return m
    return 4 * total


def video_sample(rng: np.random.Generator, qtype: str | None = None) -> tuple[np.ndarray, str, str, str,
                                                                               tuple[str, ...], int]:
    """One 64-frame clip with a question: (frames, question, answer, qtype, choices, m_min)."""
    T = VIDEO_FRAMES
    qtype = qtype or str(rng.choice(VIDEO_QTYPES))
    kind = str(rng.choice(SHAPES))
    colour = str(rng.choice(list(COLOURS)))
    if qtype == "static":
        (x, y, r), = _place(rng, 1)
        dx, dy = rng.uniform(-0.08, 0.08, size=2)  # slight drift, no clear direction
        frames = np.stack([draw([Shape(kind, colour, x + dx * t, y + dy * t, r)]) for t in range(T)])
        if rng.random() < 0.5:
            return frames, f"what colour is the {kind} ?", colour, qtype, tuple(COLOURS), 1
        other = str(rng.choice([k for k in SHAPES if k != kind])) if rng.random() < 0.5 else kind
        ans = "yes" if other == kind else "no"
        return frames, f"is there a {colour} {other} in the video ?", ans, qtype, YESNO, 1
    if qtype == "motion":
        # a shape crosses the canvas edge to edge along an axis the question names, within a window of 16-24
        # frames (still before and after it); where and when it crosses vary. One frame cannot tell the
        # direction; two frames, the first and the last, can.
        direction = str(rng.choice(DIRECTIONS))
        r = 6.0
        lo, hi = r + 2, SIZE - r - 2
        across = float(rng.uniform(lo, hi))
        duration = int(rng.integers(16, 25))
        t0 = int(rng.integers(0, T - duration))
        sign = -1.0 if direction in ("left", "up") else 1.0

        def along(t: int) -> float:
            u = min(max((t - t0) / duration, 0.0), 1.0)
            return (lo + hi) / 2 + sign * (hi - lo) * (u - 0.5)

        points = [(along(t), across) if direction in ("left", "right") else (across, along(t)) for t in range(T)]
        frames = np.stack([draw([Shape(kind, colour, x, y, r)]) for x, y in points])
        pair = ("left", "right") if direction in ("left", "right") else ("up", "down")
        return frames, f"does the {kind} move {pair[0]} or {pair[1]} ?", direction, qtype, pair, 2
    if qtype == "order":
        # two shapes of different colours: the first alone for w frames, both for w, the second alone for w
        cols = [str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)]
        kinds = [str(k) for k in rng.choice(SHAPES, size=2)]
        w = int(rng.integers(4, 17))
        t1 = int(rng.integers(1, T - 3 * w + 1))
        spans = ((t1, t1 + 2 * w), (t1 + w, t1 + 3 * w))  # frames on which each shape is on the canvas
        spots = _place(rng, 2)
        frames = np.stack([
            draw([Shape(kinds[i], cols[i], *spots[i]) for i, (a, b) in enumerate(spans) if a <= t < b])
            for t in range(T)
        ])

        def ordered(idx: np.ndarray) -> bool:  # two sampled frames from different phases
            phase = (idx - t1) // w
            return len({int(p) for p in phase[(phase >= 0) & (phase < 3)]}) >= 2

        return frames, "which colour appears first ?", cols[0], qtype, tuple(COLOURS), _m_min(ordered)
    # blink: a light blinks n times, lit 12 frames in all (12 / n per blink), at least 4 dark frames between
    n = int(rng.integers(1, 4))
    (x, y, r), = _place(rng, 1)
    on_for, dark = BLINK_LIT // n, 4
    while True:
        starts = sorted(int(s) for s in rng.choice(np.arange(1, T - on_for), size=n, replace=False))
        if all(b - a >= on_for + dark for a, b in zip(starts, starts[1:], strict=False)):
            break
    on = np.zeros(T, dtype=bool)
    for s in starts:
        on[s : s + on_for] = True
    frames = np.stack([draw([Shape(kind, colour, x, y, r)], light=bool(on[t])) for t in range(T)])

    def countable(idx: np.ndarray) -> bool:
        seen = on[idx]
        runs = int(np.sum(seen[1:] & ~seen[:-1]) + seen[0])
        return runs == n and all(np.any((idx >= s) & (idx < s + on_for)) for s in starts)

    return frames, "how many times does the light blink ?", str(n), "blink", NUMBERS[:3], _m_min(countable)


def generate(
    root: str | os.PathLike[str],
    *,
    n_images: int,
    n_videos: int,
    seed: int = 0,
    split: str = "train",
    video_format: str = "mp4",
    video_mix: tuple[str, ...] = VIDEO_QTYPES,
    tick: Callable[[], None] | None = None,
) -> tuple[Path, Path]:
    """Write ShapesWorld files under ``root`` and return the image and video JSONL paths.

    Video question types follow ``video_mix`` in turn (the default: each type equally often); a type listed
    twice is asked twice as often.

    Files: ``root/{split}_images/*.png``, ``root/{split}_videos/*.mp4`` (``video_format="frames"``: a folder
    of PNG frames per clip, ``root/{split}_videos/<n>/000.png …``, which needs no PyAV to write or read),
    ``root/{split}_images.jsonl``, ``root/{split}_videos.jsonl``. ``tick`` is called after each file.
    """
    if video_format not in ("mp4", "frames"):
        raise ValueError(f"video_format: expected mp4 or frames, got {video_format!r}")
    tick = tick or (lambda: None)
    unknown = sorted(set(video_mix) - set(VIDEO_QTYPES))
    if not video_mix or unknown:
        raise ValueError(f"video_mix: expected question types among {', '.join(VIDEO_QTYPES)}, got {video_mix}")
    root = Path(root)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    img_dir, vid_dir = root / f"{split}_images", root / f"{split}_videos"
    img_dir.mkdir(parents=True, exist_ok=True)
    vid_dir.mkdir(parents=True, exist_ok=True)
    img_jsonl, vid_jsonl = root / f"{split}_images.jsonl", root / f"{split}_videos.jsonl"
    with open(img_jsonl, "w") as fh:
        for i in range(n_images):
            pix, q, a, qt, ch = image_sample(rng)
            rel = f"{split}_images/{i:06d}.png"
            Image.fromarray(pix).save(root / rel)
            fh.write(json.dumps(_record(f"{split}-img-{i:06d}", "image", rel, q, a, qt, ch)) + "\n")
            tick()
    with open(vid_jsonl, "w") as fh:
        for i in range(n_videos):
            frames, q, a, qt, ch, m_min = video_sample(rng, video_mix[i % len(video_mix)])
            frames = half_size(frames)
            if video_format == "mp4":
                rel = f"{split}_videos/{i:06d}.mp4"
                write_mp4(root / rel, frames)
            else:
                rel = f"{split}_videos/{i:06d}"
                (root / rel).mkdir(exist_ok=True)
                for k, frame in enumerate(frames):
                    Image.fromarray(frame).save(root / rel / f"{k:03d}.png")
            fh.write(json.dumps(_record(f"{split}-vid-{i:06d}", "video", rel, q, a, qt, ch, m_min=m_min)) + "\n")
            tick()
    return img_jsonl, vid_jsonl


def vocabulary() -> list[str]:
    """Every word ShapesWorld questions and answers use (for training a tokenizer)."""
    words: set[str] = set(COLOURS) | set(SHAPES) | set(NUMBERS) | set(YESNO) | set(SIDES) | set(DIRECTIONS)
    for text in _question_templates():
        words.update(text.split())
    return sorted(words)


def _question_templates() -> Iterator[str]:
    yield "what colour is the shape ?"
    yield "is there a in the video ?"
    yield "how many shapes are there ?"
    yield "is the on the left or the right ?"
    yield "does the move or ?"
    yield "which colour appears first ?"
    yield "how many times does the light blink ?"
