"""Record files written in the training stacks' layouts (LLaMA-Factory, ms-swift)."""

import json

import pytest

from gradprobe.data import shapesworld as sw
from gradprobe.data.export import export_records
from gradprobe.data.records import read_samples
from gradprobe.errors import DataError, InputError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw")
    img, vid = sw.generate(root, n_images=6, n_videos=4, seed=0)
    return img, vid


def test_llamafactory_layout_round_trips(world, tmp_path):
    img, vid = world
    out = tmp_path / "lf"
    written = export_records({"sw_images": img, "sw_videos": vid}, out, "llamafactory")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["sw_videos"] == {"file_name": "sw_videos.json", "formatting": "sharegpt",
                                 "columns": {"messages": "conversations", "videos": "videos"}}
    assert info["sw_images"]["columns"] == {"messages": "conversations", "images": "images"}
    recs = json.loads(written["sw_videos"].read_text())
    for r in recs:
        human, gpt = r["conversations"]
        # one <video> tag per video, at the start of the user turn: what LLaMA-Factory counts
        assert human["from"] == "human" and human["value"].startswith("<video>\n")
        assert human["value"].count("<video>") == 1 and "<image>" not in human["value"]
        assert gpt["from"] == "gpt" and (out / r["videos"][0]).is_file()
        assert {"id", "qtype", "choices", "m_min"} <= set(r)
    for kind, path in (("image", img), ("video", vid)):
        back = read_samples(written[f"sw_{kind}s"])
        orig = read_samples(path)
        assert [(s.id, s.kind, s.media, s.turns) for s in back.samples] == \
            [(s.id, s.kind, s.media, s.turns) for s in orig.samples]


def test_swift_layout(world, tmp_path):
    _, vid = world
    written = export_records({"v": vid}, tmp_path / "sw", "swift")
    recs = [json.loads(x) for x in written["v"].read_text().splitlines()]
    assert [m["role"] for m in recs[0]["messages"]] == ["user", "assistant"]
    assert recs[0]["messages"][0]["content"].startswith("<video>\n") and len(recs[0]["videos"]) == 1
    assert recs[0]["videos"][0] == str((tmp_path / "sw" / "train_videos" / "000000.mp4").resolve())
    assert not (tmp_path / "sw" / "dataset_info.json").exists()


def test_bad_export_input(world, tmp_path):
    img, _ = world
    with pytest.raises(InputError, match="unknown format"):
        export_records({"a": img}, tmp_path / "x", "axolotl")
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="not a directory"):
        export_records({"a": img}, tmp_path / "f", "swift")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "missing.png",
                               "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}))
    with pytest.raises(DataError, match="file not found"):
        export_records({"a": bad}, tmp_path / "y", "llamafactory")
