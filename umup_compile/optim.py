"""u-μP optimizers and scaling rules (the public surface).

Each parameter's effective lr is its group's ``lr`` times a factor from its tags and
shape, with ``depth_scale = mup_scaling_depth ** -0.5`` (1 when ``None``) and
``fan_in`` = ``shape[0]`` (1-D), ``shape[1]`` (2-D) or ``shape[1] * shape[2]`` (3-D):

==========  ==========================  ===========================================
mup_type    Adam / AdamW lr scale       SGD lr scale (``"to_output_scale"``)
==========  ==========================  ===========================================
weight      depth_scale / sqrt(fan_in)  depth_scale * sqrt(fan_in)
bias, norm  depth_scale                 depth_scale * width (``shape[0]``)
output      depth_scale                 depth_scale
==========  ==========================  ===========================================

SGD with ``readout_constraint=None`` uses the Adam column. With
``independent_weight_decay=True`` (default) each parameter's weight decay is divided by
its initial effective lr, as in unit_scaling.
"""

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
