"""The model-agnostic probe engine: hooks, parameter selection, reference stores, sketches, and the
measurement core the estimators share."""

from gradprobe.probe.hooks import BatchGrad, GradientProbe, LossFn
from gradprobe.probe.select import ROLES, Selection, default_module_of, select_parameters
from gradprobe.probe.store import ReferenceStore, resolve_dtype

__all__ = [
    "ROLES",
    "BatchGrad",
    "GradientProbe",
    "LossFn",
    "ReferenceStore",
    "Selection",
    "default_module_of",
    "resolve_dtype",
    "select_parameters",
]
