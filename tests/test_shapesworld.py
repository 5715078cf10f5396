"""ShapesWorld: deterministic, real files, and m_min consistent with the uniform sampler."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from gradprobe.data import shapesworld as sw
from gradprobe.data.sampling import uniform_indices
from gradprobe.data.video import read_frames, read_video_frames, write_mp4


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jsonl")) + sorted(root.rglob("*.png")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_by_seed(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    sw.generate(a, n_images=20, n_videos=4, seed=3)
    sw.generate(b, n_images=20, n_videos=4, seed=3)
    sw.generate(c, n_images=20, n_videos=4, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_records_are_llava_style_with_real_files(tmp_path):
    img_jsonl, vid_jsonl = sw.generate(tmp_path, n_images=12, n_videos=8, seed=0)
    for line in img_jsonl.read_text().splitlines():
        r = json.loads(line)
        assert set(r) >= {"id", "image", "conversations", "qtype", "choices"}
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] in r["choices"]
        with Image.open(tmp_path / r["image"]) as im:
            assert im.format == "PNG" and im.size == (sw.SIZE, sw.SIZE)
    vids = [json.loads(x) for x in vid_jsonl.read_text().splitlines()]
    assert {r["qtype"] for r in vids} == set(sw.VIDEO_QTYPES)
    for r in vids:
        assert r["conversations"][0]["value"].startswith("<video>\n")  # the tag LLaMA-Factory counts
        assert isinstance(r["m_min"], int) and r["m_min"] >= 1
        frames = read_frames(tmp_path / r["video"])
        assert frames.shape == (sw.VIDEO_FRAMES, sw.VIDEO_SIZE, sw.VIDEO_SIZE, 3)


def test_mp4_round_trip_is_close(tmp_path):
    rng = np.random.default_rng(0)
    frames, *_ = sw.video_sample(rng, "motion")
    write_mp4(tmp_path / "v.mp4", frames)
    back = read_frames(tmp_path / "v.mp4")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4  # lossy codec, near-lossless settings


def test_decoding_matches_pyav_per_frame(tmp_path):
    """One scaling context per file gives the bytes PyAV's own per-frame conversion gives, resized or not."""
    import av

    rng = np.random.default_rng(1)
    frames, *_ = sw.video_sample(rng, "order")
    write_mp4(tmp_path / "v.mp4", frames)
    with av.open(str(tmp_path / "v.mp4")) as c:
        decoded = list(c.decode(video=0))
        plain = np.stack([f.to_ndarray(format="rgb24") for f in decoded])
        resized = {i: decoded[i].to_ndarray(format="rgb24", width=20, height=12) for i in (0, 5, 17)}
    assert np.array_equal(read_frames(tmp_path / "v.mp4"), plain)
    got = read_video_frames(tmp_path / "v.mp4", [17, 0, 5], size=(12, 20))
    assert sorted(got) == [0, 5, 17] and all(np.array_equal(got[i], resized[i]) for i in got)
    assert got[0].shape == (12, 20, 3)


def _light_on(frames):
    return frames[:, 2:6, 2:6].mean(axis=(1, 2, 3)) > 230


def _runs(on):
    """(start, length) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2] - edges[::2], strict=True))


def test_blink_m_min_matches_the_sampler():
    """At m_min the sampled frames show every blink as a separate run; at m_min - 1 they do not."""
    rng = np.random.default_rng(7)
    for _ in range(12):
        frames, q, ans, qtype, _, m_min = sw.video_sample(rng, "blink")
        on = _light_on(frames)
        blinks = _runs(on)
        assert len(blinks) == int(ans)  # the rendered video has n blinks
        assert on.sum() == sw.BLINK_LIT and len({n for _, n in blinks}) == 1  # lit as long, in equal blinks

        def countable(m, on=on, blinks=blinks):
            idx = uniform_indices(len(on), m)
            return len(_runs(on[idx])) == len(blinks) and all(np.any((idx >= s) & (idx < s + n)) for s, n in blinks)

        assert countable(m_min)
        assert m_min == 1 or not countable(m_min - 1)


def _colour_present(frames, colour):
    c = np.array(sw.COLOURS[colour])
    return (np.abs(frames.astype(int) - c).sum(axis=-1) < 30).sum(axis=(1, 2)) > 4


def test_order_m_min_matches_the_sampler():
    """The first colour is alone, then both are on the canvas, then the second is alone, each for as many
    frames (so the colours' frame counts do not tell the answer); m_min is the smallest budget whose sampled
    frames fall in two of these phases."""
    rng = np.random.default_rng(3)
    m_mins = []
    for _ in range(24):
        frames, q, ans, qtype, choices, m_min = sw.video_sample(rng, "order")
        assert qtype == "order" and ans in choices and q == "which colour appears first ?"
        others = [c for c in sw.COLOURS if c != ans and _colour_present(frames, c).any()]
        assert len(others) == 1  # two shapes: the answer's colour and one other
        first, second = _colour_present(frames, ans), _colour_present(frames, others[0])
        phases = [first & ~second, first & second, second & ~first]
        runs = [_runs(p) for p in phases]
        assert all(len(r) == 1 for r in runs)  # each phase is one run of frames
        (a0, w), (b0, wb), (c0, wc) = (r[0] for r in runs)
        assert w == wb == wc and 4 <= w <= 16 and b0 == a0 + w and c0 == b0 + w
        assert first.sum() == second.sum()

        def answerable(m, phases=phases):
            idx = uniform_indices(len(phases[0]), m)
            return sum(bool(p[idx].any()) for p in phases) >= 2

        assert answerable(m_min)
        assert m_min == 1 or not answerable(m_min - 1)
        m_mins.append(m_min)
    assert min(m_mins) >= 2 and max(m_mins) > min(m_mins)  # one frame never tells; budgets vary by clip


def test_motion_direction_is_in_the_frames_not_in_one_frame():
    """The shape's centre moves the asked way between the first and the last frame; its start varies, so no
    single position tells the direction (m_min = 2)."""
    rng = np.random.default_rng(5)
    starts = {}
    for _ in range(40):
        frames, q, ans, qtype, _, m_min = sw.video_sample(rng, "motion")
        assert m_min == 2
        fg = np.abs(frames.astype(int) - np.array(sw.BACKGROUND)).sum(axis=-1) > 30
        ys, xs = [], []
        for f in (fg[0], fg[-1]):
            yy, xx = np.nonzero(f)
            ys.append(yy.mean())
            xs.append(xx.mean())
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        moved = {"right": dx, "left": -dx, "down": dy, "up": -dy}
        assert max(moved, key=moved.get) == ans and moved[ans] > 20
        starts.setdefault(ans, []).append((xs[0], ys[0]))
    for pts in starts.values():
        assert len(pts) < 2 or np.ptp(np.array(pts), axis=0).max() > 10  # starts spread out


def test_half_size_is_the_block_mean():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 4, 6, 3), dtype=np.uint8)
    half = sw.half_size(frames)
    assert half.shape == (2, 2, 3, 3)
    assert half[1, 1, 2, 0] == round(frames[1, 2:4, 4:6, 0].astype(float).mean())


def test_static_budget():
    rng = np.random.default_rng(1)
    assert sw.video_sample(rng, "static")[-1] == 1


def test_missing_and_broken_video(tmp_path):
    from gradprobe.errors import DataError

    with pytest.raises(DataError, match="video file not found"):
        read_frames(tmp_path / "none.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(DataError, match="cannot decode video"):
        read_frames(tmp_path / "bad.mp4")


def test_frame_folders_need_no_pyav(tmp_path, monkeypatch):
    """`video_format="frames"` writes a PNG folder per clip; writing and reading them works without PyAV, and
    the frames equal those of the MP4 world up to the codec."""
    import sys

    from gradprobe.data.clips import ClipStore
    from gradprobe.data.records import read_samples

    _, mp4 = sw.generate(tmp_path / "mp4", n_images=0, n_videos=2, seed=5)
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails
    _, folders = sw.generate(tmp_path / "frames", n_images=0, n_videos=2, seed=5, video_format="frames")
    a = read_samples(folders).samples
    store = ClipStore(folders.parent, [8])
    clip = store.clip(a[0], 8)
    assert clip.frames.shape[0] == 8 and store.info(a[0]).total == sw.VIDEO_FRAMES
    b = read_samples(mp4).samples
    from gradprobe.errors import DataError

    with pytest.raises(DataError, match="needs PyAV"):
        ClipStore(mp4.parent, [8]).clip(b[0], 8)
    monkeypatch.delitem(sys.modules, "av")
    ref = ClipStore(mp4.parent, [8]).clip(b[0], 8)
    assert np.abs(ref.frames.astype(int) - clip.frames.astype(int)).mean() < 8  # lossy codec against PNG
    with pytest.raises(ValueError, match="video_format"):
        sw.generate(tmp_path / "x", n_images=0, n_videos=1, video_format="gif")
