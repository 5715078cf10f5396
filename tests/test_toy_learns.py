"""A regression guard for the toy's learnability: short Video-SFT runs on one temporal question type raise
restricted accuracy on held-out clips the budget can answer when the frames are in order, and do not when
every frame is the clip's middle one (the ``static`` control, which shows the guard can fail).

The recipe (:class:`gradprobe.experiments.learnability.Recipe`) is reduced to fit CI: the tiny toy, ``order``
clips only ("which colour appears first ?", chance 1/4), m = 8, 700 steps at lr 3e-4, three training seeds
per sampler. The verdict is over the seeds (a majority must end at or above 0.6 with the paired interval
above zero), so no one run's trajectory decides it. Measured with ``benchmarks/learnability.py``
(benchmarks/RESULTS.md, "The learnability guard"): from ordered frames six seeds end at 0.84–0.92 on this
recipe, the same on other kernel sets and thread counts; three static runs end at 0.30–0.34.
"""

import pytest

from gradprobe.experiments.learnability import Recipe, learns, make_data, run

pytestmark = pytest.mark.slow  # training runs: `pytest -m "not slow"` skips them

RECIPE = Recipe()
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(RECIPE, tmp_path_factory.mktemp("learnability") / "order")


def _runs(tiny_toy, data, tmp_path, sampler):
    runs = [run(tiny_toy, RECIPE, data, tmp_path / f"{sampler}-{s}", sampler=sampler, seed=s) for s in SEEDS]
    assert all(r["n"] >= 32 for r in runs)  # held-out clips that m = 8 answers
    return runs


def test_ordered_frames_teach_order(tiny_toy, data, tmp_path):
    runs = _runs(tiny_toy, data, tmp_path, "uniform")
    assert learns(runs, RECIPE), runs
    assert all(r["first"] < RECIPE.learned for r in runs)  # learned here, not before


def test_static_frames_do_not_teach_order(tiny_toy, data, tmp_path):
    runs = _runs(tiny_toy, data, tmp_path, "static")
    assert not learns(runs, RECIPE), runs
