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
]
