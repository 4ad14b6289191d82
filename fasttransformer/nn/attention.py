"""``MultiheadAttention``: torch.nn.MultiheadAttention over ``ops.scaled_dot_product_attention``,
and ``KVCache``, the keys and values one attention layer keeps across decoding steps."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from fasttransformer.ops.attention import reusing_block_lists, scaled_dot_product_attention


class KVCache:
    """Keys and values ``(B, H, length, D)`` of one attention layer, for incremental decoding.

    ``static=False`` (self-attention): every call appends the new tokens' keys and values, in
    place, to a buffer of ``capacity`` positions allocated on the first call. The keys and values
    share one ``(B, 2H, capacity, D)`` buffer (``key`` and ``value`` are its two halves), so
    ``update_stacked`` appends the k and v of one projection with one copy (one launch per layer
    and step, not two): :class:`MultiheadAttention` does.
    ``static=True`` (cross-attention): the first call projects the key/value inputs (the encoder
    memory) once; later calls reuse them and ignore their key/value arguments. The tile lists
    the Triton kernels build for its ``key_padding_mask`` are kept too (``block_lists``, which
    :class:`DecoderCache` shares between its layers), and reused while the same mask tensor
    comes unchanged; another mask, or one written in place, gets new ones.
    ``reorder(index)`` (beam search) and ``crop(length)`` (speculative decoding) edit what it holds.
    """

    def __init__(self, capacity: Optional[int] = None, static: bool = False):
        if not static and (capacity is None or capacity < 1):
            raise ValueError(f"a self-attention KVCache needs a capacity >= 1, got {capacity!r}")
        self.capacity, self.static = capacity, static
        self.block_lists: dict = {}  # static: reusing_block_lists's store
        self.key: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None
        self._buffer: Optional[torch.Tensor] = None  # (B, 2H, capacity, D): key, then value
        self.length = 0

    def update(self, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value (B, H, L_new, D)``; return every key and value held so far."""
        if self.static:
            self.key, self.value, self.length = key, value, key.shape[2]
            return key, value
        if key.dim() != 4 or value.shape != key.shape:
            raise ValueError(f"KVCache.update takes key and value of one shape (B, H, L_new, D), got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if value.dtype != key.dtype or value.device != key.device:
            raise ValueError(f"KVCache.update takes key and value of one dtype and device, got {key.dtype} on "
                             f"{key.device} and {value.dtype} on {value.device}")
        start = self._reserve(key, key.shape[1])
        self.key.narrow(2, start, key.shape[2]).copy_(key)
        self.value.narrow(2, start, key.shape[2]).copy_(value)
        return self.key.narrow(2, 0, self.length), self.value.narrow(2, 0, self.length)

    def update_stacked(self, keys_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``update`` of new keys and values given as one tensor ``(B, 2H, L_new, D)``, the keys'
        H heads then the values' (the k and v of one projection, as self-attention makes them):
        one copy into the cache, where ``update`` makes two."""
        if keys_values.dim() != 4 or keys_values.shape[1] % 2:
            raise ValueError(f"KVCache.update_stacked takes keys and values stacked as (B, 2H, L_new, D), got "
                             f"{tuple(keys_values.shape)}")
        if self.static:
            return self.update(*keys_values.chunk(2, dim=1))
        start = self._reserve(keys_values, keys_values.shape[1] // 2)
        self._buffer.narrow(2, start, keys_values.shape[2]).copy_(keys_values)
        return self.key.narrow(2, 0, self.length), self.value.narrow(2, 0, self.length)

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps the sequences ``index`` picks, in its order: ``index`` is an int64 or int32
        ``(B_new,)`` tensor of rows of the held batch (repeats allowed; B_new may differ from B),
        as beam search needs after each step. Only the held positions are copied (a
        self-attention cache keeps its capacity). A static cache reorders its projected memory
        and lets go of its tile lists (built for the old rows' memory padding mask, which the
        next calls replace by the reordered one). The bounds check reads ``index`` on the host
        (one synchronisation on a GPU)."""
        self._check_index(index)
        self._reorder(index)

    def _check_index(self, index) -> None:
        held = self._buffer if not self.static else self.key
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"index must be a 1-D int64 or int32 tensor, got {_describe(index)}")
        if held is None:
            raise RuntimeError("reorder: the cache holds nothing yet")
        if index.device != held.device:
            raise ValueError(f"index is on {index.device} but the cache on {held.device}")
        if index.numel() == 0:
            raise ValueError("index must keep at least one sequence")
        low, high = (int(bound) for bound in torch.aminmax(index))
        if not 0 <= low <= high < held.shape[0]:
            raise IndexError(f"index holds {low}..{high}, outside the cache's batch [0, {held.shape[0]})")

    def _reorder(self, index: torch.Tensor) -> None:
        if self.static:
            self.key, self.value = self.key.index_select(0, index), self.value.index_select(0, index)
            self.block_lists.clear()
            return
        heads = self.key.shape[1]
        buffer = self._buffer.new_empty(index.shape[0], *self._buffer.shape[1:])
        buffer.narrow(2, 0, self.length).copy_(self._buffer.narrow(2, 0, self.length).index_select(0, index))
        self._buffer, self.key, self.value = buffer, buffer[:, :heads], buffer[:, heads:]

    def crop(self, length: int) -> None:
        """Forgets the positions from ``length`` on (speculative decoding's rejected drafts): the
        next update writes at ``length``. Self-attention caches only."""
        if self.static:
            raise RuntimeError("KVCache.crop: a static cache holds the encoder memory, not target positions")
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= self.length:
            raise ValueError(f"length must be an int in [0, {self.length}] (the positions held), got {length!r}")
        self.length = length

    def _reserve(self, new: torch.Tensor, heads: int) -> int:
        """Room for ``new``'s positions (``heads`` key heads): checks that they match the held
        ones and fit, allocates the buffer on the first call; returns where they go."""
        batch, seqlen, head_dim = new.shape[0], new.shape[2], new.shape[3]
        if self.key is not None and ((batch, heads, head_dim) != _shape(self.key) or new.dtype != self.key.dtype
                                     or new.device != self.key.device):
            raise ValueError(f"KVCache holds keys of (batch, heads, head_dim) = {_shape(self.key)}, {self.key.dtype} "
                             f"on {self.key.device}, but the new ones are {(batch, heads, head_dim)}, {new.dtype} on "
                             f"{new.device}: a cache serves one batch of sequences (make a new one for another)")
        if self.length + seqlen > self.capacity:
            raise RuntimeError(f"KVCache is full: {self.length} + {seqlen} positions > capacity {self.capacity}")
        if self._buffer is None:
            self._buffer = new.new_empty(batch, 2 * heads, self.capacity, head_dim)
            self.key, self.value = self._buffer[:, :heads], self._buffer[:, heads:]
        start, self.length = self.length, self.length + seqlen
        return start


class MultiheadAttention(torch.nn.MultiheadAttention):
    r"""``torch.nn.MultiheadAttention`` (same constructor, parameters, state_dict keys, forward
    arguments and return values) computed by ``fasttransformer.ops.scaled_dot_product_attention``.

    Masks keep torch.nn's conventions: a bool ``attn_mask`` is True where attention is **not**
    allowed, a float one is added; ``key_padding_mask`` is True (or -inf) at padding. They reach
    the attention op in their cheapest form: the key-padding mask as ``key_padding_mask``, a 2-D
    ``attn_mask`` broadcast over batch and heads (never expanded), ``is_causal=True`` as the
    kernel's causal mask (``attn_mask`` may then be omitted, which torch refuses; when given it is
    trusted to be causal, as torch does).

    Differences from torch: a query that sees no key gives zeros (then ``out_proj``), never NaN,
    also in the returned weights. With ``add_bias_kv``/``add_zero_attn`` and ``is_causal=True``,
    every query sees the extra keys on every path (as torch computes the given causal mask);
    torch's own ``need_weights=False`` path leaves them out. ``need_weights=True`` (torch's default) returns the weights
    through a slower path that forms the ``(B, H, Lq, Lk)`` probabilities in memory; pass
    ``need_weights=False`` for the fused kernels (the Transformer layers do).

    ``forward(..., cache=KVCache(...))`` decodes incrementally: see :class:`KVCache`. With a cache,
    ``is_causal`` aligns the queries with the last keys (lower-right) and ``key_padding_mask``
    covers every cached key ``(B, length)``.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, cache: Optional[KVCache] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask, cache)
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E), the layout the projections read
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, seqlen_q = query.shape[:2]
        q, k, v = self._project(query, key, value, cache)
        seqlen_k = k.shape[2]

        # Masks in the op's conventions: bool True = may attend, float added.
        causal_offset = None  # is_causal: top-left (0), or aligned with the last cached keys
        if is_causal:
            attn_mask = None  # the hint says attn_mask is the causal mask: the kernel makes its own
            causal_offset = seqlen_k - seqlen_q if cache is not None else 0
            if cache is not None and seqlen_q == 1:
                causal_offset = None  # the one new query sees every cached key
        if attn_mask is not None and attn_mask.dim() == 3:  # (B * H, Lq, Lk) or unbatched (H, Lq, Lk)
            attn_mask = attn_mask.view(batch, self.num_heads, seqlen_q, seqlen_k)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # torch.nn: True = not allowed
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            bias = key_padding_mask.to(q.dtype)[:, None, None, :]  # a float padding mask is added
            if attn_mask is None:
                attn_mask = bias
            elif attn_mask.dtype == torch.bool:
                attn_mask = _restrict(bias, attn_mask)
            else:
                attn_mask = attn_mask.to(q.dtype) + bias
            key_padding_mask = None
        extra_keys = self.bias_k is not None or self.add_zero_attn
        window_size = None
        if causal_offset is not None and (causal_offset != 0 or extra_keys or need_weights):
            if attn_mask is None and not extra_keys and not need_weights and torch.compiler.is_compiling():
                # dynamo cannot build a CausalBias (a tensor subclass with non-tensor arguments):
                # the same keys, j <= i + offset, as a window over the top-left alignment
                window_size = (seqlen_k, causal_offset)
            elif attn_mask is None and not extra_keys and not need_weights:
                attn_mask = causal_lower_right(seqlen_q, seqlen_k)  # a bias object: nothing materialised
            else:
                causal = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device).tril(causal_offset)
                attn_mask = causal if attn_mask is None else _restrict(attn_mask, causal)
            causal_offset = None
        if extra_keys:
            k, v, attn_mask, key_padding_mask = self._extra_keys(k, v, attn_mask, key_padding_mask)

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, attn_mask, key_padding_mask, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            static = cache is not None and cache.static and key_padding_mask is not None
            reuse = (reusing_block_lists(cache.block_lists) if static and not torch.compiler.is_compiling()
                     else contextlib.nullcontext())
            with reuse:
                out = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                   is_causal=causal_offset is not None,
                                                   key_padding_mask=key_padding_mask, window_size=window_size)
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # (B, Lq, E)
        if not batched:
            return out.squeeze(0), weights.squeeze(0) if weights is not None else None
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, cache) -> bool:
        """Whether the inputs are batched; errors name the argument (torch raises AssertionError)."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be (L, E) or batched 3-D, got shape {tuple(query.shape)}")
        for name, tensor in (("key", key), ("value", value)):
            if tensor.dim() != query.dim():
                raise ValueError(f"{name} is {tensor.dim()}-D but query is {query.dim()}-D")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dim is {query.shape[-1]}, expected embed_dim = {self.embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key/value last dims are {key.shape[-1]}/{value.shape[-1]}, "
                             f"expected kdim/vdim = {self.kdim}/{self.vdim}")
        batched = query.dim() == 3
        batch_dim = 0 if self.batch_first or not batched else 1
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
            if mask is not None and mask.device != query.device:
                raise ValueError(f"{name} is on {mask.device} but query is on {query.device}")
        seqlen_q, seqlen_k = query.shape[1 - batch_dim if batched else 0], key.shape[1 - batch_dim if batched else 0]
        batch = query.shape[batch_dim] if batched else None
        keys, reuse = "Lk", False  # reuse: a static cache's memory keys, projected once (key/value unused)
        if cache is not None:  # the masks are checked here too: a call that raises leaves the cache as it was
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a fasttransformer.nn.KVCache, got {type(cache).__name__}")
            if not batched:
                raise ValueError("cache needs batched inputs")
            reuse = cache.static and cache.key is not None
            if reuse:
                seqlen_k, keys = cache.length, "the cached length"
            elif not cache.static:
                seqlen_k, keys = cache.length + seqlen_k, "cached + new positions"
        if not reuse and batched and (key.shape[batch_dim] != batch or value.shape[batch_dim] != batch):
            raise ValueError(f"batch sizes differ: query {batch}, key {key.shape[batch_dim]}, "
                             f"value {value.shape[batch_dim]}")
        if not reuse and key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in batch or length")
        if key_padding_mask is not None:
            expected = (batch, seqlen_k) if batched else (seqlen_k,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"key_padding_mask must be (batch, {keys}) = {expected}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            heads = self.num_heads * (batch if batched else 1)
            if tuple(attn_mask.shape) not in ((seqlen_q, seqlen_k), (heads, seqlen_q, seqlen_k)):
                raise ValueError(f"attn_mask must be (Lq, Lk) = {(seqlen_q, seqlen_k)} or (batch * num_heads, "
                                 f"Lq, Lk) = {(heads, seqlen_q, seqlen_k)}, got {tuple(attn_mask.shape)}")
        return batched

    def _project(self, query, key, value, cache):
        """(B, L, E) inputs -> (B, H, L, head_dim) q, k, v; one matmul for self-attention, and
        with a cache, one copy of k and v into it when they come from one matmul."""
        def heads(x):
            return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # (B, L, n * E) -> (B, n * H, L, D)

        weight, bias, embed_dim = self.in_proj_weight, self.in_proj_bias, self.embed_dim
        reuse = cache is not None and cache.static and cache.key is not None
        if self._qkv_same_embed_dim and query is key and key is value and not reuse:
            # self-attention, a decoding step's too: one matmul (and one launch) for q, k and v
            qkv = heads(F.linear(query, weight, bias))
            if cache is None:
                return qkv.chunk(3, dim=1)
            return (qkv[:, :self.num_heads], *cache.update_stacked(qkv[:, self.num_heads:]))
        biases = bias.split(embed_dim) if bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = weight.split(embed_dim)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        q = heads(F.linear(query, w_q, biases[0]))
        if reuse:
            return q, cache.key, cache.value
        if key is value and self._qkv_same_embed_dim:  # k and v of one input: one matmul
            kv_bias = bias[embed_dim:] if bias is not None else None
            kv = heads(F.linear(key, weight[embed_dim:], kv_bias))
            return (q, *(kv.chunk(2, dim=1) if cache is None else cache.update_stacked(kv)))
        k, v = heads(F.linear(key, w_k, biases[1])), heads(F.linear(value, w_v, biases[2]))
        return (q, k, v) if cache is None else (q, *cache.update(k, v))

    def _extra_keys(self, k, v, attn_mask, key_padding_mask):
        """``add_bias_kv`` / ``add_zero_attn``: extra keys every query sees, masks padded to match."""
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.view(1, self.num_heads, 1, self.head_dim).expand(k.shape[0], -1, -1, -1))
            extra_v.append(self.bias_v.view(1, self.num_heads, 1, self.head_dim).expand(v.shape[0], -1, -1, -1))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(k.shape[0], self.num_heads, 1, self.head_dim))
            extra_v.append(v.new_zeros(v.shape[0], self.num_heads, 1, self.head_dim))
        count = len(extra_k)
        k, v = torch.cat([k, *extra_k], dim=2), torch.cat([v, *extra_v], dim=2)
        if attn_mask is not None:  # bool True = may attend, float 0 = no bias
            attn_mask = F.pad(attn_mask, (0, count), value=attn_mask.dtype == torch.bool)
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, count), value=False)
        return k, v, attn_mask, key_padding_mask


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor"
    return type(value).__name__


def _shape(tensor: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, heads, head_dim) of a (B, H, L, D) tensor."""
    return (tensor.shape[0], tensor.shape[1], tensor.shape[3])


def _restrict(attn_mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``attn_mask`` (op conventions) further limited to ``allowed`` (bool, True = may attend)."""
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return torch.where(allowed, attn_mask, float("-inf"))  # broadcasts both ways


def _attention_with_weights(q, k, v, attn_mask, key_padding_mask, dropout_p):
    """The ``need_weights=True`` path: the probabilities ``(B, H, Lq, Lk)`` are formed in memory
    (as torch.nn does) and returned after dropout, as torch returns them. Rows with no visible
    key give zero weights."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = _restrict(scores, attn_mask) if attn_mask.dtype == torch.bool else scores + attn_mask.to(scores.dtype)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    no_key = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(no_key, 0.0), dim=-1).masked_fill(no_key, 0.0)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights
