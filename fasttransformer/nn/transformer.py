"""The torch.nn Transformer family over fasttransformer's attention, and ``convert``.

Each class subclasses its torch.nn namesake and replaces only ``forward``: the constructor,
parameters, ``state_dict`` keys, defaults and ``extra_repr`` are torch's own, so weights load
both ways with ``strict=True``. The forwards hand the masks to the attention op as they are
(a key-padding mask stays a ``(B, Lk)`` mask, a causal mask becomes ``is_causal``), without
torch's fast paths that convert them into dense float masks or nested tensors (the encoder
still returns the padded positions as torch's nested path does: zeros).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
from torch.nn.modules.transformer import _detect_is_causal_mask

from fasttransformer.nn.attention import KVCache, MultiheadAttention


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` over fasttransformer's attention (same arguments).

    ``is_causal=True`` makes the self-attention causal; ``src_mask`` may then be omitted (torch
    requires it); when given it is trusted to be causal, as torch does.

    ``forward(..., cache=KVCache(capacity))`` decodes incrementally, as in a decoder-only model
    built of encoder layers: ``src`` holds only the new positions, ``is_causal`` aligns them with
    the last cached keys, and ``src_key_padding_mask`` covers every cached position.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.self_attn.__class__ = MultiheadAttention

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False, *,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        def self_attention(x):
            x = self.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                               need_weights=False, is_causal=is_causal, cache=cache)[0]
            return self.dropout1(x)

        x = src
        if self.norm_first:
            x = x + self_attention(self.norm1(x))
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self_attention(x))
        return self.norm2(x + self._feed_forward(x))

    def _feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` over fasttransformer's attention (same arguments).

    ``forward(..., cache=(self_attn_cache, cross_attn_cache))`` decodes incrementally (two
    :class:`KVCache`, the second static): ``tgt`` holds only the new positions and
    ``tgt_key_padding_mask`` covers every cached one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.self_attn.__class__ = MultiheadAttention
        self.multihead_attn.__class__ = MultiheadAttention

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: Optional[torch.Tensor] = None,
                memory_mask: Optional[torch.Tensor] = None, tgt_key_padding_mask: Optional[torch.Tensor] = None,
                memory_key_padding_mask: Optional[torch.Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, *,
                cache: Optional[Tuple[KVCache, KVCache]] = None) -> torch.Tensor:
        self_cache, cross_cache = cache if cache is not None else (None, None)

        def self_attention(x):
            x = self.self_attn(x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                               need_weights=False, is_causal=tgt_is_causal, cache=self_cache)[0]
            return self.dropout1(x)

        def cross_attention(x):
            x = self.multihead_attn(x, memory, memory, attn_mask=memory_mask,
                                    key_padding_mask=memory_key_padding_mask, need_weights=False,
                                    is_causal=memory_is_causal, cache=cross_cache)[0]
            return self.dropout2(x)

        x = tgt
        if self.norm_first:
            x = x + self_attention(self.norm1(x))
            x = x + cross_attention(self.norm2(x))
            return x + self._feed_forward(self.norm3(x))
        x = self.norm1(x + self_attention(x))
        x = self.norm2(x + cross_attention(x))
        return self.norm3(x + self._feed_forward(x))

    def _feed_forward(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoder(torch.nn.TransformerEncoder):
    """``torch.nn.TransformerEncoder`` (same arguments; torch.nn layers given to it are converted).

    Never converts inputs to nested tensors: padding is skipped inside the attention kernels.
    Where torch would take its nested-tensor path (``enable_nested_tensor`` and its layer
    conditions, eval mode, no gradient, a ``src_key_padding_mask`` with the padding at the end
    and no ``mask``), the padded positions come out as torch gives them there: zeros before the
    final ``norm``. Elsewhere they are computed, as on torch's other paths.

    ``forward(..., cache=DecoderCache(num_layers, capacity))`` decodes incrementally (a
    decoder-only model: causal encoder layers), one :class:`KVCache` per layer
    (``cache.self_attn``; its ``cross_attn`` is unused): see :class:`TransformerEncoderLayer`.
    """

    def __init__(self, encoder_layer, num_layers, norm=None, enable_nested_tensor=True, mask_check=True):
        with warnings.catch_warnings():  # torch's advice on its nested-tensor path, which is replaced
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor=enable_nested_tensor,
                             mask_check=mask_check)
        convert(self.layers)

    def forward(self, src: torch.Tensor, mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: Optional[bool] = None, *,
                cache: Optional["DecoderCache"] = None) -> torch.Tensor:
        seq_dim = 1 if self.layers[0].self_attn.batch_first and src.dim() == 3 else 0
        is_causal = _detect_is_causal_mask(mask, is_causal, src.shape[seq_dim])
        _check_cache(cache, self.layers)
        # torch has no cache: with one, its nested path (which keeps src's positions only) has no match
        zero_padding = self._torch_zeroes_padding(src, mask, src_key_padding_mask) if cache is None else None
        for index, layer in enumerate(self.layers):
            layer_cache = {"cache": cache.self_attn[index]} if cache is not None else {}
            src = layer(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal,
                        **layer_cache)
        if zero_padding is not None:
            src = src.masked_fill(zero_padding[..., None], 0.0)
        return self.norm(src) if self.norm is not None else src

    def _torch_zeroes_padding(self, src, mask, src_key_padding_mask) -> Optional[torch.Tensor]:
        """The padded positions ``(B, L)`` when torch's own forward would run its nested-tensor
        path, which returns zeros there (its conditions, in its order); else None."""
        if (src_key_padding_mask is None or not torch.backends.mha.get_fastpath_enabled()
                or not getattr(self, "use_nested_tensor", False) or self.layers[0].training or src.dim() != 3
                or src.is_nested or mask is not None or torch.is_autocast_enabled()):
            return None
        if self.mask_check and torch.compiler.is_compiling():
            return None
        first = self.layers[0]
        weights = (src, first.self_attn.in_proj_weight, first.self_attn.in_proj_bias, first.self_attn.out_proj.weight,
                   first.self_attn.out_proj.bias, first.norm1.weight, first.norm1.bias, first.norm2.weight,
                   first.norm2.bias, first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias)
        if (torch.overrides.has_torch_function(weights)
                or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in weights))):
            return None
        # torch canonicalises the mask to float (0 = keep) and keeps the zeros: a nonzero is padding
        padded = src_key_padding_mask if src_key_padding_mask.dtype == torch.bool else src_key_padding_mask != 0
        if tuple(padded.shape) != tuple(src.shape[:2]):
            return None  # torch's layers reject it; let ours say why
        if self.mask_check and not bool((padded[:, :-1] <= padded[:, 1:]).all()):  # torch syncs here too
            return None  # not left-aligned: torch computes every position
        return padded


class TransformerDecoder(torch.nn.TransformerDecoder):
    """``torch.nn.TransformerDecoder`` (same arguments; torch.nn layers given to it are converted).

    ``forward(..., cache=DecoderCache(...))`` decodes incrementally: ``tgt`` holds only the new
    positions (see :class:`DecoderCache`)."""

    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__(decoder_layer, num_layers, norm)
        convert(self.layers)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: Optional[torch.Tensor] = None,
                memory_mask: Optional[torch.Tensor] = None, tgt_key_padding_mask: Optional[torch.Tensor] = None,
                memory_key_padding_mask: Optional[torch.Tensor] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False, *, cache: Optional["DecoderCache"] = None) -> torch.Tensor:
        seq_dim = 1 if self.layers[0].self_attn.batch_first and tgt.dim() == 3 else 0
        tgt_is_causal = _detect_is_causal_mask(tgt_mask, tgt_is_causal, tgt.shape[seq_dim])
        _check_cache(cache, self.layers)
        for index, layer in enumerate(self.layers):
            layer_cache = (cache.self_attn[index], cache.cross_attn[index]) if cache is not None else None
            tgt = layer(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask,
                        memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                        memory_is_causal=memory_is_causal, cache=layer_cache)
        return self.norm(tgt) if self.norm is not None else tgt


class DecoderCache:
    """The :class:`KVCache` pair of every layer of a decoder: the self-attention keys and values of
    up to ``capacity`` target positions, and the encoder memory projected once per layer. A
    :class:`TransformerEncoder` run as a decoder-only model uses the self-attention ones only."""

    def __init__(self, num_layers: int, capacity: int):
        self.self_attn: List[KVCache] = [KVCache(capacity) for _ in range(num_layers)]
        self.cross_attn: List[KVCache] = [KVCache(static=True) for _ in range(num_layers)]
        shared: dict = {}  # every layer sees the same memory padding mask: its tile lists are built once
        for cache in self.cross_attn:
            cache.block_lists = shared

    @property
    def length(self) -> int:
        """Target positions held."""
        return self.self_attn[0].length if self.self_attn else 0

    def reorder(self, index: torch.Tensor) -> None:
        """``KVCache.reorder`` for every layer: the self-attention keys and values and the
        projected memory (of the layers that hold one) keep the sequences ``index`` picks (beam
        search). Pass the memory padding mask reordered the same way on the next calls."""
        held = [cache for cache in self.self_attn + self.cross_attn if cache.key is not None]
        if not held:
            raise RuntimeError("reorder: the cache holds nothing yet")
        held[0]._check_index(index)  # once (one host synchronisation), before any change
        for cache in held:
            cache._reorder(index)

    def crop(self, length: int) -> None:
        """``KVCache.crop`` for every layer's self-attention cache (the memory stays)."""
        for cache in self.self_attn:
            cache.crop(length)


def _check_cache(cache, layers) -> None:
    if cache is None:
        return
    if not isinstance(cache, DecoderCache):
        raise TypeError(f"cache must be a fasttransformer.nn.DecoderCache, got {type(cache).__name__}")
    if len(cache.self_attn) != len(layers):
        raise ValueError(f"cache has {len(cache.self_attn)} layers, the stack {len(layers)}")


class Transformer(torch.nn.Transformer):
    """``torch.nn.Transformer`` (same arguments, parameters and forward) built from
    fasttransformer's layers; ``custom_encoder`` / ``custom_decoder`` made of torch.nn layers are
    converted too."""

    def __init__(self, *args, **kwargs):
        with warnings.catch_warnings():  # torch's advice on its nested-tensor path, which is replaced
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            super().__init__(*args, **kwargs)
        convert(self)


_TWINS = {
    torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
    torch.nn.TransformerEncoder: TransformerEncoder,
    torch.nn.TransformerDecoder: TransformerDecoder,
    torch.nn.Transformer: Transformer,
}


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Make every ``torch.nn`` ``MultiheadAttention``, ``TransformerEncoderLayer`` and
    ``TransformerDecoderLayer`` inside ``module`` (and the ``TransformerEncoder`` /
    ``TransformerDecoder`` / ``Transformer`` holding them) run on fasttransformer, in place.

    The modules stay the same objects and only their class changes, so parameters, buffers,
    hooks, optimizers and references held elsewhere all stay valid. Only exact torch.nn classes
    are converted: a user subclass keeps its own forward. Returns ``module``.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for child in module.modules():
        twin = _TWINS.get(type(child))
        if twin is not None:
            child.__class__ = twin
    return module
