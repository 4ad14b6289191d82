"""``TokenPositionalEmbedding``: the module over ``ops.token_positional_embedding``."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fasttransformer.ops.embedding import token_positional_embedding


class TokenPositionalEmbedding(torch.nn.Module):
    r"""Token embedding scaled by ``scale`` plus positional encoding, then dropout, in one kernel.

    Args:
        num_embeddings: vocabulary size ``V``.
        embedding_dim: model dim ``d``.
        padding_idx: this row gets no gradient and is initialised to zeros
            (as ``torch.nn.Embedding``).
        max_positions: ``None`` for the sinusoidal encoding (no parameters), or the number of
            learned positions (a trainable ``pos_weight`` of shape ``(max_positions, d)``).
        scale: multiplier of the token embedding; ``None`` means ``sqrt(embedding_dim)``.
        dropout: dropout probability, applied in training mode only.

    Parameters are initialised from ``N(0, embedding_dim ** -0.5)`` so that the scaled
    embedding has unit variance (fairseq's choice; ``torch.nn.Embedding`` uses ``N(0, 1)``).

    Shape: ``input_ids (B, L)`` int32/int64 -> ``(B, L, d)`` in the parameters' dtype.
    ``forward(input_ids, start_pos=0, *, check_ids=True)`` takes ``start_pos`` as an int or a
    ``(B,)`` tensor; ``check_ids=False`` skips the host synchronisation of the id check on CUDA
    (see ``ops.token_positional_embedding``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_positions: Optional[int] = None, scale: Optional[float] = None,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if num_embeddings < 0 or embedding_dim < 0:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 0, got "
                             f"{num_embeddings} and {embedding_dim}")
        if max_positions is None and embedding_dim % 2:
            raise ValueError(f"the sinusoidal encoding needs an even embedding_dim, got {embedding_dim}")
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be None or >= 1, got {max_positions}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), "
                                 f"got {padding_idx}")
            padding_idx %= num_embeddings
        factory = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_positions, self.dropout = padding_idx, max_positions, dropout
        self.scale = math.sqrt(embedding_dim) if scale is None else float(scale)
        self.weight = torch.nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory))
        if max_positions is None:
            self.register_parameter("pos_weight", None)
        else:
            self.pos_weight = torch.nn.Parameter(torch.empty(max_positions, embedding_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.embedding_dim ** -0.5 if self.embedding_dim else 1.0
        torch.nn.init.normal_(self.weight, std=std)
        if self.pos_weight is not None:
            torch.nn.init.normal_(self.pos_weight, std=std)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()

    def forward(self, input_ids: torch.Tensor, start_pos: Union[int, torch.Tensor] = 0, *,
                check_ids: bool = True) -> torch.Tensor:
        return token_positional_embedding(
            input_ids, self.weight, self.pos_weight, scale=self.scale, padding_idx=self.padding_idx,
            start_pos=start_pos, dropout_p=self.dropout if self.training else 0.0, check_ids=check_ids,
        )

    def extra_repr(self) -> str:
        positions = "sinusoidal" if self.max_positions is None else f"max_positions={self.max_positions}"
        text = f"{self.num_embeddings}, {self.embedding_dim}, {positions}, scale={self.scale:.4g}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        if self.dropout:
            text += f", dropout={self.dropout}"
        return text
