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
        assert frames.shape == (sw.VIDEO_FRAMES, sw.SIZE, sw.SIZE, 3)


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


def test_blink_m_min_matches_the_sampler():
    """At m_min the sampled frames show every blink as a separate run; at m_min - 1 they do not."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(12):
        frames, q, ans, qtype, _, m_min = sw.video_sample(rng, "blink")
        on = _light_on(frames)
        n = int(ans)
        assert int(np.sum(on[1:] & ~on[:-1]) + on[0]) == n  # the rendered video has n blinks

        starts = np.flatnonzero(on & ~np.concatenate([[False], on[:-1]]))

        def countable(m, on=on, n=n, starts=starts):
            idx = uniform_indices(len(on), m)
            seen = on[idx]
            runs = int(np.sum(seen[1:] & ~seen[:-1]) + seen[0])
            return runs == n and all(np.any((idx >= s) & (idx < s + 2)) for s in starts)

        assert countable(m_min)
        assert m_min == 1 or not countable(m_min - 1)
        checked += 1
    assert checked == 12


def test_static_and_motion_budgets():
    rng = np.random.default_rng(1)
    assert sw.video_sample(rng, "static")[-1] == 1
    assert sw.video_sample(rng, "motion")[-1] == 2


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
