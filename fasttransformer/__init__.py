"""fasttransformer: fused masked attention and Transformer layers for PyTorch.

Public API: ``fasttransformer.ops`` (functional ops), ``fasttransformer.nn`` (modules).
"""
import torch  # noqa: F401  (loads libtorch before the native extension)

from fasttransformer import nn, ops

__version__ = "0.1.0"
__all__ = ["nn", "ops", "__version__"]
