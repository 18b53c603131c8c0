"""Cost model: targets, kernel decomposition, latency predictors, memory, calibration.

>>> from archpass.costmodel import estimate, load_target
>>> est = estimate(structure, load_target("edgetpu"))
>>> est.latency_ms, est.peak_activation_bytes
"""

from archpass.costmodel.estimate import Estimate, KernelEstimate, estimate, predict_kernels
from archpass.costmodel.host import host_notes
from archpass.costmodel.kernels import FusionRules, Kernel, decompose
from archpass.costmodel.memory import Memory, memory
from archpass.costmodel.target import Target, builtin_names, list_targets, load_target, save_target

__all__ = [
    "Estimate",
    "KernelEstimate",
    "estimate",
    "predict_kernels",
    "FusionRules",
    "Kernel",
    "decompose",
    "Memory",
    "memory",
    "Target",
    "builtin_names",
    "list_targets",
    "load_target",
    "save_target",
    "host_notes",
]
