"""Execute notebooks in place, from the repository root, so that their committed outputs come from a command.

    GRADPROBE_TRAP_DIR=benchmarks/results/toy_v5/trap/seed-0 … python benchmarks/execute_notebooks.py \
        notebooks/temporal_trap_toy.ipynb

Each notebook reads its inputs from the environment variables it names (paths relative to the repository root
are kept relative, so the outputs show them as given). A notebook that raises is not written back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    a = ap.parse_args()
    for path in a.notebooks:
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=a.timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
        nbformat.write(nb, path)
        print(f"executed {path}")


if __name__ == "__main__":
    main()
