"""umup_compile: u-μP optimizers for PyTorch, compiled to fused kernels."""

from . import optim
from .parameter import Parameter, has_parameter_data

__all__ = ["Parameter", "has_parameter_data", "optim"]

# The one place the version is written: pyproject.toml reads it statically
# ([tool.setuptools.dynamic]); bump it together with CHANGELOG.md.
__version__ = "0.1.0"
