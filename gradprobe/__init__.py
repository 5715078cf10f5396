"""gradprobe: gradient-conflict diagnostics for multimodal LLMs.

Measures how video fine-tuning gradients align with image gradients in a shared
model, per frame budget, with confidence intervals and the threshold m*.
"""

from gradprobe._version import __version__
from gradprobe.errors import BudgetError, DataError, GradprobeError, InputError, ModelError
from gradprobe.estimators.align import AlignInterrupted, AlignReport, Progress, align
from gradprobe.estimators.curvature import CurvatureInterrupted, CurvatureReport, curvature
from gradprobe.estimators.decompose import DecomposeInterrupted, DecomposeReport, decompose
from gradprobe.estimators.hvp import HessianOperator
from gradprobe.estimators.spectrum import hutchinson_trace, lanczos, power_iteration, spectral_density
from gradprobe.probe import GradientProbe, ReferenceStore, select_parameters

__all__ = [
    "AlignInterrupted",
    "AlignmentCallback",
    "AlignReport",
    "BudgetError",
    "CurvatureInterrupted",
    "CurvatureReport",
    "DataError",
    "DecomposeInterrupted",
    "DecomposeReport",
    "GradientProbe",
    "GradprobeError",
    "HessianOperator",
    "InputError",
    "ModelError",
    "Progress",
    "ReferenceStore",
    "__version__",
    "align",
    "curvature",
    "decompose",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
    "select_parameters",
    "spectral_density",
    "watch",
]

#: The training callback pulls in transformers' Trainer machinery (twice the import time of the rest), so it
#: is imported on first use rather than at ``import gradprobe``.
_LAZY = {"AlignmentCallback": "gradprobe.train.callback", "watch": "gradprobe.train.callback"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
