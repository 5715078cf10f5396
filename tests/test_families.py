"""Every supported family through the real loading path: tiny checkpoints built here, saved with
save_pretrained, loaded with from_pretrained / AutoProcessor, and run by `gradprobe align`."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from gradprobe.data import shapesworld as sw
from gradprobe.data.records import read_samples
from gradprobe.models.registry import family_for
from gradprobe.models.tiny import FAMILY_NAMES, create_tiny

runner = CliRunner()
ENV = {"COLUMNS": "300"}
SMALL = ["--image-batches", "2", "--video-batches", "2", "--batch-size", "2", "--video-batch-size", "2",
         "--n-boot", "50", "--device", "cpu"]


def _sharegpt(rec: dict, kind: str, tag: str) -> dict:
    q, a = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    q = q.replace("<image>", tag)
    return {"id": rec["id"], "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            kind + "s": [rec[kind]]}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """ShapesWorld probe data in every supported record format and video form."""
    d = tmp_path_factory.mktemp("world")
    sw.generate(d, n_images=6, n_videos=6, seed=1, split="probe")
    imgs = [json.loads(x) for x in (d / "probe_images.jsonl").read_text().splitlines()]
    vids = [json.loads(x) for x in (d / "probe_videos.jsonl").read_text().splitlines()]
    # LLaVA JSON array; ShareGPT messages (ms-swift / LLaMA-Factory) JSONL and JSON
    (d / "images.json").write_text(json.dumps(imgs))
    (d / "images_sharegpt.jsonl").write_text("\n".join(json.dumps(_sharegpt(r, "image", "<image>")) for r in imgs))
    (d / "videos_sharegpt.json").write_text(json.dumps([_sharegpt(r, "video", "<video>") for r in vids]))
    # LLaMA-Factory's ShareGPT variant: conversations + videos list
    lf = [dict(id=r["id"], conversations=r["conversations"], videos=[r["video"]]) for r in vids]
    (d / "videos_lf.jsonl").write_text("\n".join(json.dumps(r) for r in lf))
    # frame folders instead of files
    from gradprobe.data.video import read_frames

    folder_recs = []
    for r in vids:
        fd = d / "frames" / r["id"]
        fd.mkdir(parents=True)
        for i, f in enumerate(read_frames(d / r["video"])):
            from PIL import Image

            Image.fromarray(f).save(fd / f"frame_{i}.png")
        folder_recs.append(dict(r, video=f"frames/{r['id']}"))
    (d / "videos_folders.jsonl").write_text("\n".join(json.dumps(r) for r in folder_recs))
    return d


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    made: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("ckpts")

    def make(family: str, seed: int = 0) -> Path:
        if (family, seed) not in made:
            made[(family, seed)] = create_tiny(family, root / f"{family}-{seed}", sw.vocabulary(), seed=seed)
        return made[(family, seed)]

    return make


# which record format and video form each family's end-to-end test reads (all are covered)
DATA = {
    "qwen2_5_vl": ("probe_images.jsonl", "probe_videos.jsonl"),  # LLaVA JSONL; LLaVA-Video-178K <image>
    "qwen3_vl": ("images_sharegpt.jsonl", "videos_folders.jsonl"),  # ShareGPT messages; frame folders
    "llava_next_video": ("images.json", "videos_sharegpt.json"),  # LLaVA JSON array; ShareGPT JSON array
    "llava": ("probe_images.jsonl", "videos_lf.jsonl"),  # LLaMA-Factory conversations + videos
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_align_end_to_end(family, world, ckpt, tmp_path):
    out = tmp_path / "out"
    img, vid = DATA[family]
    attn = ["--attn-implementation", "eager"] if family == "qwen3_vl" else []
    r = runner.invoke(app, ["align", "--model", str(ckpt(family)), "--image-data", str(world / img),
                            "--video-data", str(world / vid), "--frames", "8,16,32,64", *SMALL, "--out", str(out),
                            *attn], env=ENV)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["meta"]["family"] == family
    assert [b["frames"] for b in s["budgets"]] == [8, 16, 32, 64]
    assert all(b["n"] == 2 and np.isfinite(b["mean"]) for b in s["budgets"])
    # confounds recorded per budget: visual tokens double with m, per-frame pixels stay (fixed policy)
    key = "image_visual_tokens" if family == "llava" else "video_visual_tokens"
    tokens = [b["batch_info"][key] for b in s["budgets"]]
    assert tokens == [tokens[0] * k for k in (1, 2, 4, 8)]
    assert len({b["batch_info"]["pixels_per_frame"] for b in s["budgets"]}) == 1
    seq = [b["batch_info"]["seq_len"] for b in s["budgets"]]
    assert seq == sorted(seq) and seq[0] < seq[-1]
    assert s["meta"]["sampler"] == "uniform" and s["meta"]["pixel_policy"]["kind"] == "fixed"
    roles = set(pd.read_csv(out / "modules.csv")["role"])
    assert roles == {"vision", "projector", "language", "head"}


def _runs(labels):
    """Contiguous runs of labelled positions."""
    pos = (labels != -100).nonzero().flatten().tolist()
    runs, cur = [], []
    for p in pos:
        if cur and p != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(p)
    return runs + ([cur] if cur else [])


# (family, template variant): the released templates' shapes, with subword tokenizers that merge leading spaces
LABEL_CASES = [(f, None) for f in FAMILY_NAMES] + [("llava_next_video", "mistral")]


@pytest.mark.parametrize(("family", "template"), LABEL_CASES)
def test_labels_are_exactly_the_answers(family, template, world, ckpt, tmp_path):
    """Each assistant turn is labelled as its answer plus the end-of-turn token the family trains on, never a
    template token around it (a two-turn record whose first answer is followed by the next user turn)."""
    from transformers import AutoProcessor

    from gradprobe.data.records import parse_record
    from gradprobe.models.base import load_image

    d = ckpt(family) if template is None else create_tiny(family, tmp_path / "m", sw.vocabulary(), template=template)
    adapter = family_for(d).adapter_class()(AutoProcessor.from_pretrained(d))
    first = read_samples(world / "probe_images.jsonl").samples[0]
    rec = {"id": "two", "image": first.media, "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "It is blue, clearly."},
        {"from": "human", "value": "how many shapes are there ?"}, {"from": "gpt", "value": "2"}]}
    samples = [parse_record(rec, "two"), *read_samples(world / "probe_images.jsonl").samples[:2]]
    batch = adapter.collate(samples, images={s.media: load_image(world, s) for s in samples})
    eot = {"qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>"}.get(family, "</s>")
    tok = adapter.tokenizer
    for i, s in enumerate(samples):
        answers = [t for r, t in s.turns if r == "assistant"]
        got = [tok.decode(batch["input_ids"][i][run]) for run in _runs(batch["labels"][i])]
        assert got == [a + eot for a in answers], (tok.convert_ids_to_tokens(batch["input_ids"][i]), got)
    # the tokenizer merges leading spaces as the released ones do, so the check above is not vacuous
    pieces = tok.convert_ids_to_tokens(tok("It is blue", add_special_tokens=False)["input_ids"])
    assert any(p.startswith(("▁", "Ġ")) for p in pieces), pieces
    if family.startswith("qwen"):  # M-RoPE needs them; without, Qwen2.5-VL silently uses 1-D positions
        assert "mm_token_type_ids" in batch


def test_template_without_video_placeholder_is_a_clear_error(world, tmp_path):
    from transformers import AutoProcessor

    from gradprobe.data.clips import ClipStore
    from gradprobe.errors import ModelError
    from gradprobe.models.qwen2_5_vl import Qwen2_5_VLAdapter

    d = create_tiny("qwen2_5_vl", tmp_path / "m", sw.vocabulary())
    proc = AutoProcessor.from_pretrained(d)
    # a text-only template: it drops the video content item
    proc.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                          "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    adapter = Qwen2_5_VLAdapter(proc)
    vids = read_samples(world / "probe_videos.jsonl").samples[:1]
    with pytest.raises(ModelError, match="renders no <\\|video_pad\\|> placeholder for the video"):
        adapter.collate(vids, store=ClipStore(world, [4], size_of=adapter.frame_size), m=4)


def test_align_matches_float64_brute_force_with_gradless_parameters(world, ckpt):
    """LLaVA (vision_feature_layer=-2: the last vision layer gets no gradient) against autograd in float64."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from gradprobe import align
    from gradprobe.data.clips import ClipStore
    from gradprobe.models.base import batch_info, load_image, loss_fn, strip_info
    from gradprobe.models.llava import LlavaAdapter

    d = ckpt("llava")
    model = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float64)
    adapter = LlavaAdapter(AutoProcessor.from_pretrained(d))
    imgs = read_samples(world / "probe_images.jsonl").samples[:4]
    vids = read_samples(world / "probe_videos.jsonl").samples[:4]
    images = {s.media: load_image(world, s) for s in imgs}
    store = ClipStore(world, [2, 4], size_of=adapter.frame_size)

    def f64(b):
        return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in b.items()}

    ib = [f64(adapter.collate(imgs[i:i + 2], images=images)) for i in (0, 2)]
    vb = {m: [f64(adapter.collate(vids[i:i + 2], store=store, m=m)) for i in (0, 2)] for m in (2, 4)}
    rep = align(model, ib, vb, loss_fn, role_of=adapter.role_of, module_of=adapter.module_of, image_groups=1,
                n_boot=0, batch_info=batch_info)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(b):
        g = torch.autograd.grad(model(**strip_info(b)).loss, params, allow_unused=True)
        return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params, strict=False)])

    g_img = (grad(ib[0]) + grad(ib[1])) / 2
    for m in (2, 4):
        rows = rep.batches[rep.batches.frames == m].sort_values("batch")
        for j, b in enumerate(vb[m]):
            assert rows["value"].iloc[j] == pytest.approx(float(g_img @ grad(b)), rel=1e-9)
    last = rep.modules[rep.modules.module == "model.vision_tower.vision_model.encoder.layers.1"]
    if last.empty:
        last = rep.modules[rep.modules.module.str.endswith("vision_tower.encoder.layers.1")]
    assert not last.empty and (last["mean"] == 0).all()


def test_samplers_and_pixel_policy(world, ckpt, tmp_path):
    from gradprobe.data.clips import ClipStore
    from gradprobe.data.sampling import sample_indices, uniform_indices

    assert (sample_indices(64, 8, "static") == 31).all()
    shuf = sample_indices(64, 8, "shuffled", key="a")
    assert sorted(shuf) == sorted(uniform_indices(64, 8)) and list(shuf) != list(uniform_indices(64, 8))
    assert list(shuf) == list(sample_indices(64, 8, "shuffled", key="a"))  # seeded: reruns agree
    s = read_samples(world / "probe_videos.jsonl").samples[0]
    clip = ClipStore(world, [8], "static").clip(s, 8)
    assert all((f == clip.frames[0]).all() for f in clip.frames)
    out = tmp_path / "total"
    r = runner.invoke(app, ["align", "--model", str(ckpt("qwen2_5_vl")), "--image-data",
                            str(world / "probe_images.jsonl"), "--video-data", str(world / "probe_videos.jsonl"),
                            "--frames", "2,8", *SMALL, "--out", str(out), "--pixel-policy", "total",
                            "--total-pixels", str(2 * 32 * 32), "--sampler", "shuffled"], env=ENV)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    px = [b["batch_info"]["pixels_per_frame"] for b in s["budgets"]]
    assert px == [32 * 32, 16 * 16]  # a total budget: per-frame resolution falls with m (clips are 32 × 32)
    assert s["meta"]["sampler"] == "shuffled" and s["meta"]["pixel_policy"]["kind"] == "total"


def test_several_checkpoints(world, ckpt, tmp_path):
    out = tmp_path / "many"
    a, b = ckpt("qwen3_vl", 0), ckpt("qwen3_vl", 1)
    r = runner.invoke(app, ["align", "--model", f"{a},{b}", "--image-data", str(world / "probe_images.jsonl"),
                            "--video-data", str(world / "probe_videos.jsonl"), "--frames", "2,4", *SMALL,
                            "--out", str(out)], env=ENV)
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out / "checkpoints.csv")
    assert list(table["checkpoint"].unique()) == [f"00-{a.name}", f"01-{b.name}"]
    assert len(table) == 4
    one = json.loads((out / f"00-{a.name}" / "summary.json").read_text())
    assert one["budgets"][0]["mean"] == pytest.approx(table["mean"].iloc[0])
    assert table["mean"].iloc[0] != table["mean"].iloc[2]  # different weights, same batches
    assert one["budgets"][0]["ci95_t"] == pytest.approx([table["ci95_t_lo"].iloc[0], table["ci95_t_hi"].iloc[0]])
    assert (table["video_visual_tokens"].iloc[:2] == table["video_visual_tokens"].iloc[2:].to_numpy()).all()
    r = runner.invoke(app, ["plot", str(out)], env=ENV)
    assert r.exit_code == 0 and (out / "checkpoints.png").stat().st_size > 10_000, r.output


def test_unit_roles_and_budget_rules_from_configs():
    """Every parameter of each family gets a role; budget rules as stated (models from configs, not saved)."""
    from gradprobe.errors import BudgetError
    from gradprobe.models import tiny
    from gradprobe.models.registry import family_named

    for fam in FAMILY_NAMES:
        model, proc = tiny._BUILDERS[fam](sw.vocabulary(), 32)
        family = family_named(fam)
        cls = family.adapter_class()
        assert family.frames == cls.budget_rule() and cls.architectures == family.architectures
        adapter = cls(proc)
        roles = {n: adapter.role_of(n) for n, _ in model.named_parameters()}
        assert None not in roles.values(), [n for n, r in roles.items() if r is None]
        assert set(roles.values()) == {"vision", "projector", "language", "head"}
        if fam.startswith("qwen"):
            adapter.check_budget(8)
            for bad in (1, 7):
                with pytest.raises(BudgetError, match="even m"):
                    adapter.check_budget(bad)
        else:
            assert adapter.check_budget(1) == 1 and adapter.check_budget(7) == 7


# ---------------------------------------------------------------------------- bad input


def _assert_one_line_error(r, needle):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    err = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1, r.output
    assert needle in err[0], err[0]


def _bad_videos(world, tmp_path, bad: list[dict]) -> Path:
    """A video file whose first records are ``bad``, then the good ones (paths made absolute)."""
    good = [json.loads(x) for x in (world / "probe_videos.jsonl").read_text().splitlines()]
    for r in good:
        r["video"] = str(world / r["video"])
    p = tmp_path / "videos.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in bad + good) + "\n")
    return p


def _run(ckpt_dir, world, videos, *extra):
    return runner.invoke(app, ["align", "--model", str(ckpt_dir), "--image-data", str(world / "probe_images.jsonl"),
                               "--video-data", str(videos), "--frames", "8", *SMALL, *extra], env=ENV)


def _conv(answer="red"):
    turns = [{"from": "human", "value": "<video>\nwhat colour is the circle ?"}]
    return turns + ([{"from": "gpt", "value": answer}] if answer is not None else [])


@pytest.mark.parametrize("case, needle", [
    ("missing", "video file not found"),
    ("undecodable", "cannot decode video"),
    ("no_answer", "record without an answer"),
    ("empty_folder", "frame folder holds no images"),
])
def test_bad_record_is_one_line_then_skipped_and_counted(case, needle, world, ckpt, tmp_path):
    rec = {"id": "bad-0", "video": str(tmp_path / "nope.mp4"), "conversations": _conv()}
    if case == "undecodable":
        (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 100)
        rec["video"] = str(tmp_path / "junk.mp4")
    elif case == "no_answer":
        rec["conversations"] = _conv(None)
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        rec["video"] = str(tmp_path / "empty")
    videos = _bad_videos(world, tmp_path, [rec])
    _assert_one_line_error(_run(ckpt("llava"), world, videos, "--out", str(tmp_path / "a")), needle)
    r = _run(ckpt("llava"), world, videos, "--out", str(tmp_path / "b"), "--skip-bad")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["meta"]["skipped"]["video"]["count"] == 1 and needle in s["meta"]["skipped"]["video"]["first"][0]
    assert "videos.jsonl:1" in s["meta"]["skipped"]["video"]["first"][0]


def test_short_video_is_sampled_with_repetition_and_flagged(world, ckpt, tmp_path):
    from gradprobe.data.video import read_frames, write_mp4

    write_mp4(tmp_path / "short.mp4", read_frames(world / "probe_videos" / "000000.mp4")[:5])
    videos = _bad_videos(world, tmp_path, [{"id": "short-0", "video": str(tmp_path / "short.mp4"),
                                            "conversations": _conv()}])
    r = _run(ckpt("llava_next_video"), world, videos, "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["meta"]["short_clips"] == {"8": ["short-0"]}
    rows = pd.read_csv(tmp_path / "o" / "alignment.csv")
    assert list(rows.sort_values("batch")["short_clips"]) == [1, 0]


def test_mixed_formats_and_bad_options(world, ckpt, tmp_path):
    recs = [json.loads(x) for x in (world / "probe_videos.jsonl").read_text().splitlines()]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(recs[0]) + "\n" + json.dumps(_sharegpt(recs[1], "video", "<video>")) + "\n")
    for extra in ([], ["--skip-bad"]):
        _assert_one_line_error(_run(ckpt("llava"), world, mixed, *extra, "--out", str(tmp_path / "m")),
                               "file mixes formats")
    vids = world / "probe_videos.jsonl"
    _assert_one_line_error(_run(ckpt("qwen2_5_vl"), world, vids, "--frames", "7", "--out", str(tmp_path / "q")),
                           "qwen2_5_vl takes even m")
    _assert_one_line_error(_run(ckpt("llava"), world, vids, "--pixel-policy", "total", "--out", str(tmp_path / "l")),
                           "only the fixed policy applies")
    _assert_one_line_error(_run(ckpt("llava"), world, vids, "--sampler", "reverse", "--out", str(tmp_path / "s")),
                           "unknown sampler 'reverse'")
    _assert_one_line_error(_run(ckpt("llava"), world, world / "probe_images.jsonl", "--out", str(tmp_path / "k")),
                           "image record in the video data")
    _assert_one_line_error(runner.invoke(app, ["align", "--model", f"{ckpt('llava')},{ckpt('qwen3_vl')}",
                                               "--image-data", str(world / "probe_images.jsonl"),
                                               "--video-data", str(vids), "--frames", "8", *SMALL], env=ENV),
                           "different families")


def test_records_formats(tmp_path):
    from gradprobe.errors import DataError

    p = tmp_path / "r.json"
    p.write_text(json.dumps([
        {"id": "a", "video": "v.mp4", "conversations": [
            {"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
    ]))
    s = read_samples(p).samples[0]
    assert (s.kind, s.media, s.answer) == ("video", "v.mp4", "a2")  # LLaVA-Video-178K: <image> in a video record
    assert s.turns == (("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    p.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "<image>what?"},
                                          {"role": "assistant", "content": "x"}], "images": ["i.png"]}) + "\n")
    s = read_samples(p).samples[0]
    assert (s.kind, s.media, s.turns[0], s.turns[1]) == ("image", "i.png", ("system", "be brief"), ("user", "what?"))
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>q"},
                                          {"role": "assistant", "content": "x"}], "images": ["a.png", "b.png"]}))
    with pytest.raises(DataError, match="2 images/videos"):
        read_samples(p)
    p.write_text("")
    with pytest.raises(DataError, match="data file is empty"):
        read_samples(p)
    p.write_text('{"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "q"}]}\n{nope\n')
    with pytest.raises(DataError, match="r.json:1: record without an answer"):
        read_samples(p)
    with pytest.raises(DataError, match=r"no usable image records \(2 skipped"):
        read_samples(p, kind="image", skip_bad=True)


def test_truncated_weights_are_one_line(ckpt, tmp_path):
    """A truncated model.safetensors: a ModelError naming the checkpoint (one line, exit 2), not safetensors'
    traceback."""
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from gradprobe.errors import ModelError
    from gradprobe.models.registry import family_for

    d = tmp_path / "broken"
    shutil.copytree(ckpt("qwen2_5_vl"), d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot load checkpoint"):
        family_for(d).adapter_class().load(d)
    data = sw.generate(tmp_path / "data", n_images=4, n_videos=2, seed=0, split="probe")
    r = CliRunner().invoke(app, ["align", "--frames", "2", "--model", str(d), "--image-data", str(data[0]),
                                 "--video-data", str(data[1]), "--image-batches", "1", "--video-batches", "1",
                                 "--batch-size", "2", "--video-batch-size", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "cannot load checkpoint" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sft_trains_every_family(family, world, ckpt, tmp_path):
    """`gradprobe sft` trains each family's checkpoint through its adapter (the pipeline `align` uses)."""
    from gradprobe.models.registry import adapter_for

    img, vid = DATA[family]
    out = tmp_path / "sft"
    r = runner.invoke(app, ["sft", "--model", str(ckpt(family)), "--video-data", str(world / vid),
                            "--image-probe", str(world / img), "--frames", "2", "--steps", "2", "--batch-size", "2",
                            "--probe-every", "1", "--probe-batches", "2", "--probe-batch-size", "2",
                            "--save-steps", "2", "--lr", "1e-3", "--out", str(out)], env=ENV)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "sft_summary.json").read_text())
    assert s["family"] == family and s["steps"] == 2 and s["probes"] == 2
    rows = [json.loads(x) for x in (out / "gradprobe_trajectory.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1] and all(x["finite"] and x["update_norm"] > 0 for x in rows)
    # the saved model is the family's again and its weights moved
    assert family_for(out / "final").name == family
    cls = adapter_for(out / "final")
    before, _ = cls.load(ckpt(family))
    after, _ = cls.load(out / "final")
    moved = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any("language_model" in k for k in moved) and any("vision" in k or "visual" in k for k in moved)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_visual_token_estimate_equals_the_processor(family, world, ckpt):
    """The count the memory check uses, from the processor's settings alone, equals the visual tokens the
    processor writes (so a budget too large to fit is refused with the right numbers)."""
    from transformers import AutoProcessor

    from gradprobe.data.clips import ClipStore
    from gradprobe.models.base import batch_info

    adapter = family_for(ckpt(family)).adapter_class()(AutoProcessor.from_pretrained(ckpt(family)))
    vids = read_samples(world / "probe_videos.jsonl").samples[:1]
    store = ClipStore(world, [2, 8], size_of=adapter.frame_size)
    info = store.info(vids[0])
    for m in (2, 8):
        got = batch_info(adapter.collate(vids, store=store, m=m))
        key = "image_visual_tokens" if family == "llava" else "video_visual_tokens"
        assert adapter.visual_tokens(info.height, info.width, m)[1] == got[key], (m, got)


def test_adapters_register_themselves(tmp_path):
    """A new family is one decorated class: found by its architecture string, listed with its own facts."""
    import json

    from gradprobe.errors import ModelError
    from gradprobe.models import registry
    from gradprobe.models.clip_vision import ClipVisionAdapter
    from gradprobe.models.llava import LlavaAdapter
    from gradprobe.models.llava_next_video import LlavaNextVideoAdapter

    # the built-in families, each with a tiny checkpoint builder; the toy is found by its marker only
    names = {f.name for f in registry.families()}
    assert names == {*FAMILY_NAMES, "toy"}
    assert "Qwen2_5_VLForConditionalGeneration" in registry.supported_architectures()
    assert registry.family_of("Qwen2_5_VLForConditionalGeneration").name == "qwen2_5_vl"
    assert not issubclass(LlavaAdapter, LlavaNextVideoAdapter) and issubclass(LlavaAdapter, ClipVisionAdapter)
    try:
        @registry.register
        class MyAdapter(LlavaAdapter):
            family = "my_vlm"
            architectures = ("MyVLMForConditionalGeneration",)
            note = "a user's own"

        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MyVLMForConditionalGeneration"]}))
        fam = registry.family_for(tmp_path)
        assert fam.adapter_class() is MyAdapter and fam.frames == "any m ≥ 1" and fam.note == "a user's own"
        with pytest.raises(ModelError, match="registered twice"):
            @registry.register
            class Other(LlavaAdapter):
                family = "my_vlm"
                architectures = ("X",)
    finally:
        registry._ADAPTERS.pop("my_vlm", None)
    with pytest.raises(ModelError, match="is not supported"):
        registry.family_of("MyVLMForConditionalGeneration")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_budget_every_method_on_every_family(family, world, ckpt, tmp_path):
    """`gradprobe budget` writes a manifest with each method on each family's tiny checkpoint (the judge is
    the checkpoint itself: plumbing only, a tiny model cannot judge)."""
    _, vid = DATA[family]
    for method in ("redundancy", "sufficiency", "gradient", "judge"):
        out = tmp_path / method
        r = runner.invoke(app, ["budget", "--model", str(ckpt(family)), "--video-data", str(world / vid),
                                "--frames", "2,4", "--method", method, "--limit", "2", "--out", str(out)],
                          env=ENV)
        assert r.exit_code == 0, (method, r.output)
        rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(x["frames"] in (2, 4) and x["method"] == method for x in rows)
        assert all(x["scores"]["4"] == 0.0 for x in rows)
        s = json.loads((out / "budget_summary.json").read_text())
        assert s["n"] == 2 and s["visual_tokens"] <= s["visual_tokens_at_largest"]
