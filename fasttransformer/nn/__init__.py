"""Modules: ``fasttransformer.nn.TokenPositionalEmbedding``."""
from fasttransformer.nn.embedding import TokenPositionalEmbedding

__all__ = ["TokenPositionalEmbedding"]
