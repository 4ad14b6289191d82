"""fasttransformer: fused masked attention and Transformer layers for PyTorch.

Public API: ``fasttransformer.ops`` (functional ops), ``fasttransformer.nn`` (modules),
``fasttransformer.models`` (Seq2SeqTransformer) and ``fasttransformer.convert``.
"""
import torch  # noqa: F401  (loads libtorch before the native extension)

from fasttransformer import models, nn, ops
from fasttransformer.nn import convert

__version__ = "0.1.0"
__all__ = ["convert", "models", "nn", "ops", "__version__"]
