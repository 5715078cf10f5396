"""The measurement core on an FSDP2-sharded model: two CPU ranks (gloo), each holding pieces of every
parameter and feeding the same batches, give the single process's dots, squared norms, pair statistics and
Gram matrices (float64, 1e-9), with exact rows and with a sketch (pieces sketched at their global offsets)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("probe_dist_worker.py")


def _run(mode, sketch, out):
    cmd = [sys.executable, str(WORKER), mode, sketch, str(out)]
    if mode == "fsdp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def _flat(x):
    if isinstance(x, list):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for k in sorted(x):
            yield from _flat(x[k])
    else:
        yield x


@pytest.mark.parametrize("sketch", ["exact", "64"])
def test_two_sharded_ranks_equal_one_process(sketch, tmp_path):
    one = _run("single", sketch, tmp_path / "one.json")
    two = _run("fsdp", sketch, tmp_path / "two.json")
    assert one["mode"] == two["mode"] == ("exact" if sketch == "exact" else "sketch")
    assert one["modules"] == two["modules"]
    a, b = list(_flat([one["rows"], one["gram"]])), list(_flat([two["rows"], two["gram"]]))
    assert len(a) == len(b) == 98
    for x, y in zip(a, b, strict=True):
        assert x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), (x, y)
    # the statistics are not trivially zero: the pair of the last batch is its dot with the one before
    assert any(abs(v) > 1e-3 for v in one["rows"][-1]["pair"])
