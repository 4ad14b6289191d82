"""Models: ``fasttransformer.models.Seq2SeqTransformer``."""
from fasttransformer.models.seq2seq import Seq2SeqTransformer

__all__ = ["Seq2SeqTransformer"]
