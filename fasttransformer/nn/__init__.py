"""Modules: drop-in twins of torch.nn's Transformer family, and ``TokenPositionalEmbedding``."""
from fasttransformer.nn.attention import KVCache, MultiheadAttention
from fasttransformer.nn.embedding import TokenPositionalEmbedding
from fasttransformer.nn.transformer import (
    DecoderCache,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    convert,
)

__all__ = [
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
    "TransformerDecoder", "Transformer", "TokenPositionalEmbedding", "KVCache", "DecoderCache", "convert",
]
