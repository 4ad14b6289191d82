"""``Seq2SeqTransformer``: the encoder-decoder of "Attention Is All You Need" on fasttransformer's
fused embedding and attention, with greedy KV-cache generation."""
from __future__ import annotations

from typing import Optional

import torch

from fasttransformer.nn import DecoderCache, TokenPositionalEmbedding, Transformer


class Seq2SeqTransformer(torch.nn.Module):
    r"""Token + positional embeddings (one fused kernel), ``fasttransformer.nn.Transformer``
    (``batch_first=True``, ReLU, post-norm as torch's default) and a linear projection to the
    target vocabulary.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: as
            ``torch.nn.Transformer``; ``dropout`` also applies to the embeddings.
        pad_id: the padding token: padded source and target positions are masked as keys, except
            the first target position, the start token, which may be ``pad_id`` (T5's
            convention: its decoder starts from the pad token).
        max_positions: ``None`` for the sinusoidal encoding, an int for learned positions.
        share_embeddings: one embedding table for source and target (needs equal vocabularies).
        tie_output: the output projection reuses the target embedding table (the paper's choice).
        norm_first: pre-norm layers.

    ``forward(src_ids (B, Ls), tgt_ids (B, Lt))`` -> logits ``(B, Lt, tgt_vocab_size)``: teacher
    forcing, the decoder's self-attention causal.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, pad_id: int = 0, max_positions: Optional[int] = None, *,
                 share_embeddings: bool = False, tie_output: bool = True, norm_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(f"share_embeddings needs equal vocabularies, got {src_vocab_size} and {tgt_vocab_size}")
        for name, size in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size)):
            if not 0 <= pad_id < size:
                raise ValueError(f"pad_id {pad_id} is outside [0, {name} = {size})")
        self.pad_id = pad_id
        embedding = {"padding_idx": pad_id, "max_positions": max_positions, "dropout": dropout, **factory}
        self.src_embed = TokenPositionalEmbedding(src_vocab_size, d_model, **embedding)
        self.tgt_embed = (self.src_embed if share_embeddings
                          else TokenPositionalEmbedding(tgt_vocab_size, d_model, **embedding))
        self.transformer = Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                       dropout, batch_first=True, norm_first=norm_first, **factory)
        self.output_projection = torch.nn.Linear(d_model, tgt_vocab_size, bias=False, **factory)
        if tie_output:
            self.output_projection.weight = self.tgt_embed.weight

    def encode(self, src_ids: torch.Tensor):
        """The encoder memory ``(B, Ls, d)`` and the source padding mask ``(B, Ls)``."""
        padding = src_ids == self.pad_id
        memory = self.transformer.encoder(self.src_embed(src_ids), src_key_padding_mask=padding, is_causal=False)
        return memory, padding

    def target_padding(self, tgt_ids: torch.Tensor) -> torch.Tensor:
        """The target padding mask ``(B, Lt)``: the pad tokens after the first position (the
        start token is a key every position sees, also when it is ``pad_id``)."""
        padding = tgt_ids == self.pad_id
        padding[:, 0] = False
        return padding

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        memory, src_padding = self.encode(src_ids)
        out = self.transformer.decoder(self.tgt_embed(tgt_ids), memory,
                                       tgt_key_padding_mask=self.target_padding(tgt_ids),
                                       memory_key_padding_mask=src_padding, tgt_is_causal=True)
        return self.output_projection(out)

    @torch.no_grad()
    def generate(self, src_ids: torch.Tensor, max_new_tokens: int, bos_id: int, eos_id: int) -> torch.Tensor:
        """Greedy decoding with a KV cache: each step runs the decoder on the newest token only,
        against the cached keys and values of the earlier ones; the encoder memory is projected
        once per layer. Gives the tokens that re-running ``forward`` on the whole prefix at every
        step gives.

        Returns ``(B, T)`` new tokens, ``T <= max_new_tokens`` (the BOS is not included): a
        sequence ends with its ``eos_id`` and is ``pad_id`` after it; decoding stops early once
        every sequence has ended.
        """
        if src_ids.dim() != 2:
            raise ValueError(f"src_ids must be (batch, length), got shape {tuple(src_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        vocab = self.output_projection.out_features
        for name, token in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= token < vocab:
                raise ValueError(f"{name} {token} is outside [0, tgt_vocab_size = {vocab})")
        positions = self.tgt_embed.pos_weight
        if positions is not None and max_new_tokens > positions.shape[0]:  # step t reads position t
            raise ValueError(f"max_new_tokens {max_new_tokens} needs {max_new_tokens} target positions, but the "
                             f"learned positions stop at max_positions = {positions.shape[0]}")
        batch = src_ids.shape[0]
        memory, src_padding = self.encode(src_ids)
        cache = DecoderCache(len(self.transformer.decoder.layers), capacity=max_new_tokens + 1)
        tokens = torch.full((batch, max_new_tokens + 1), self.pad_id, dtype=src_ids.dtype, device=src_ids.device)
        tokens[:, 0] = bos_id
        finished = torch.zeros(batch, dtype=torch.bool, device=src_ids.device)
        # The target padding mask (pad tokens after the BOS are masked keys, as in forward) matters
        # only once a sequence that goes on has emitted a pad token. Until then it is left out (the
        # attention then skips its key-padding work); finished sequences' outputs are discarded.
        pad_in_prefix = False
        for step in range(max_new_tokens):
            hidden = self.transformer.decoder(
                # argmax ids are in range: no host synchronisation for the id check
                self.tgt_embed(tokens[:, step:step + 1], start_pos=step, check_ids=False), memory,
                tgt_key_padding_mask=self.target_padding(tokens[:, :step + 1]) if pad_in_prefix else None,
                memory_key_padding_mask=src_padding, tgt_is_causal=True, cache=cache)
            next_token = self.output_projection(hidden[:, -1]).argmax(-1).to(tokens.dtype)
            tokens[:, step + 1] = next_token.masked_fill(finished, self.pad_id)
            finished |= next_token == eos_id
            # one host sync per step: stop when every sequence has ended (and, until the mask is
            # on, learn whether a sequence that goes on emitted a pad)
            if pad_in_prefix:
                done = bool(finished.all())
            else:
                emitted_pad = ((next_token == self.pad_id) & ~finished).any()
                done, pad_in_prefix = torch.stack((finished.all(), emitted_pad)).tolist()
            if done:
                return tokens[:, 1:step + 2]
        return tokens[:, 1:]
