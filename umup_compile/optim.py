"""u-μP optimizers and scaling rules (the public surface)."""

from ._describe import describe
from ._optimizers import SGD, Adam, AdamW
from ._plan import scaled_parameters
from ._rules import lr_scale_for_depth, lr_scale_func_adam, lr_scale_func_sgd

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "describe",
    "lr_scale_for_depth",
    "lr_scale_func_adam",
    "lr_scale_func_sgd",
    "scaled_parameters",
]
