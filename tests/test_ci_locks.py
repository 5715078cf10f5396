"""CI's pinned environments: every line of `.ci/stacks` has its lock and its tests, every lock pins exact
versions, and the README's *Tested versions* states the versions the locks pin."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / ".ci" / "locks"
STATED = ("torch", "transformers", "accelerate", "peft", "datasets", "llamafactory", "ms_swift")


def _pins(path):
    lines = [x for x in path.read_text().splitlines() if x.strip() and not x.startswith("#")]
    pins = dict(x.split("==", 1) for x in lines if re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", x))
    assert len(pins) == len(lines), f"{path.name}: lines that are not exact pins"
    return pins


def _stacks():
    lines = (ROOT / ".ci" / "stacks").read_text().splitlines()
    return [x.split()[0] for x in lines if x.strip() and not x.lstrip().startswith("#")]


def test_every_environment_has_a_lock_and_its_tests():
    stacks = _stacks()
    assert stacks == ["llamafactory", "swift"]
    assert sorted(p.stem for p in LOCKS.glob("*.txt")) == sorted(["build", "main", *stacks])
    for name in stacks:
        assert (ROOT / "tests" / f"test_{name}.py").is_file()
    for name in ("main", *stacks):
        pins = _pins(LOCKS / f"{name}.txt")
        assert {"torch", "transformers", "pytest"} <= set(pins), name
    assert "llamafactory" in _pins(LOCKS / "llamafactory.txt") and "ms_swift" in _pins(LOCKS / "swift.txt")


def test_readme_states_the_locked_versions():
    paragraphs = (ROOT / "README.md").read_text().split("\n\n")
    stated = " ".join(next(p for p in paragraphs if p.startswith("**Tested versions.**")).split())
    for name in ("main", *_stacks()):
        for pkg, version in _pins(LOCKS / f"{name}.txt").items():
            if pkg in STATED:
                assert f"{pkg} {version}" in stated, (name, pkg, version)
