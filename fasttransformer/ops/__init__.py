"""Functional ops: ``fasttransformer.ops.token_positional_embedding``."""
from fasttransformer.ops.embedding import token_positional_embedding

__all__ = ["token_positional_embedding"]
