"""Functional ops: ``scaled_dot_product_attention`` and ``token_positional_embedding``."""
from fasttransformer.ops.attention import scaled_dot_product_attention
from fasttransformer.ops.embedding import token_positional_embedding

__all__ = ["scaled_dot_product_attention", "token_positional_embedding"]
