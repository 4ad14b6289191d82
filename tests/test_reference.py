"""The reference model is trusted because it agrees with torch: its SDPA with
torch.nn.functional.scaled_dot_product_attention, its modules with their torch.nn namesakes
(loading the same state_dict), all in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from fasttransformer import reference

F64 = torch.float64


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_sinusoid_hand_values():
    encoding = reference.sinusoidal_positions(torch.tensor([0, 1, 7]), 6)
    close(encoding[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=F64))
    for row, p in ((1, 1), (2, 7)):
        for i in range(3):
            angle = p / 10000 ** (2 * i / 6)
            assert encoding[row, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-15)
            assert encoding[row, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-15)


def test_embedding_reference_is_scaled_lookup_plus_encoding():
    ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    weight = torch.randn(10, 8, dtype=F64)
    starts = torch.tensor([2, 5])
    out = reference.token_positional_embedding(ids, weight, scale=2.5, start_pos=starts)
    for b in range(2):
        for t in range(3):
            expected = weight[ids[b, t]] * 2.5 + reference.sinusoidal_positions(starts[b] + t, 8)
            close(out[b, t], expected)
    pos_weight = torch.randn(20, 8, dtype=F64)
    close(reference.token_positional_embedding(ids, weight, pos_weight, start_pos=4),
          weight[ids] + pos_weight[4:7])


def qkv(batch=2, heads=3, seq_q=7, seq_k=9, dim=8, kv_heads=None):
    return (torch.randn(batch, heads, seq_q, dim, dtype=F64),
            torch.randn(batch, kv_heads or heads, seq_k, dim, dtype=F64),
            torch.randn(batch, kv_heads or heads, seq_k, dim, dtype=F64))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal", "bool+causal", "gqa", "scale"])
def test_sdpa_matches_torch(mask_kind):
    q, k, v = qkv(kv_heads=1 if mask_kind == "gqa" else None, seq_k=7 if "causal" in mask_kind else 9)
    kwargs = {}
    if "bool" in mask_kind:
        mask = torch.rand(2, 1, 7, k.shape[2]) > 0.3
        mask[..., 0] = True  # every row sees a key (torch gives NaN otherwise)
        kwargs["attn_mask"] = mask
    if mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(7, 9, dtype=F64)
    if "causal" in mask_kind:
        kwargs["is_causal"] = True
    if mask_kind == "gqa":
        kwargs["enable_gqa"] = True
    if mask_kind == "scale":
        kwargs["scale"] = 0.3
    if mask_kind == "bool+causal":  # torch does not take both: merge for it
        causal = torch.ones(7, 7, dtype=torch.bool).tril()
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=kwargs["attn_mask"] & causal)
    else:
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    close(reference.scaled_dot_product_attention(q, k, v, **kwargs), expected)


def test_sdpa_key_padding_mask_equals_boolean_mask():
    q, k, v = qkv()
    padding = torch.rand(2, 9) > 0.6
    padding[:, 0] = False
    out = reference.scaled_dot_product_attention(q, k, v, key_padding_mask=padding)
    close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :]))


def test_sdpa_fully_masked_rows_are_zero_not_nan():
    q, k, v = qkv()
    mask = torch.ones(7, 9, dtype=torch.bool)
    mask[3] = False  # query 3 sees nothing
    out = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all() and (out[:, :, 3] == 0).all() and (out[:, :, 2] != 0).all()
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1] = True  # sequence 1 is all padding
    out = reference.scaled_dot_product_attention(q, k, v, key_padding_mask=padding)
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    float_mask = torch.zeros(7, 9, dtype=F64)
    float_mask[5] = float("-inf")
    assert (reference.scaled_dot_product_attention(q, k, v, attn_mask=float_mask)[:, :, 5] == 0).all()


def test_sdpa_dropout_mask_scales_kept_probabilities():
    q, k, v = qkv()
    keep = torch.rand(2, 3, 7, 9) > 0.25
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    expected = (torch.softmax(scores, -1) * keep / 0.75) @ v
    close(reference.scaled_dot_product_attention(q, k, v, dropout_p=0.25, dropout_mask=keep), expected)


def load_from(torch_module, ref_module):
    ref_module.load_state_dict(torch_module.state_dict(), strict=True)
    return ref_module


@pytest.mark.parametrize("mask_kind", ["none", "bool2d", "float2d", "bool3d", "padding", "float-padding", "causal"])
def test_multihead_attention_matches_torch(mask_kind):
    torch_mha = torch.nn.MultiheadAttention(12, 3, batch_first=True, dtype=F64)
    ref_mha = load_from(torch_mha, reference.MultiheadAttention(12, 3, dtype=F64))
    query, memory = torch.randn(2, 5, 12, dtype=F64), torch.randn(2, 6, 12, dtype=F64)
    kwargs, keys = {}, memory
    if mask_kind == "bool2d":
        kwargs["attn_mask"] = torch.rand(5, 6) > 0.6
        kwargs["attn_mask"][:, 0] = False
    elif mask_kind == "float2d":
        kwargs["attn_mask"] = torch.randn(5, 6, dtype=F64)
    elif mask_kind == "bool3d":
        kwargs["attn_mask"] = torch.rand(2 * 3, 5, 6) > 0.6
        kwargs["attn_mask"][..., 0] = False
    elif mask_kind == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    elif mask_kind == "float-padding":
        kwargs["key_padding_mask"] = torch.randn(2, 6, dtype=F64)
    elif mask_kind == "causal":
        keys = query
        kwargs.update(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=F64), is_causal=True)
    expected, _ = torch_mha(query, keys, keys, **kwargs)
    close(ref_mha(query, keys, keys, **kwargs), expected)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_and_decoder_layers_match_torch(norm_first):
    config = {"d_model": 16, "nhead": 4, "dim_feedforward": 24, "norm_first": norm_first, "dtype": F64}
    torch_enc = torch.nn.TransformerEncoderLayer(**config, dropout=0.0, batch_first=True)
    torch_dec = torch.nn.TransformerDecoderLayer(**config, dropout=0.0, batch_first=True)
    ref_enc = load_from(torch_enc, reference.TransformerEncoderLayer(**config))
    ref_dec = load_from(torch_dec, reference.TransformerDecoderLayer(**config))
    src, tgt = torch.randn(3, 8, 16, dtype=F64), torch.randn(3, 5, 16, dtype=F64)
    src_padding = torch.zeros(3, 8, dtype=torch.bool)
    src_padding[1, 6:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=F64)
    memory = torch_enc(src, src_key_padding_mask=src_padding)
    close(ref_enc(src, src_key_padding_mask=src_padding), memory)
    expected = torch_dec(tgt, memory, tgt_mask=causal, memory_key_padding_mask=src_padding, tgt_is_causal=True)
    close(ref_dec(tgt, memory, tgt_is_causal=True, memory_key_padding_mask=src_padding), expected)


def test_transformer_matches_torch_and_loads_its_state_dict():
    config = {"d_model": 16, "nhead": 2, "num_encoder_layers": 2, "num_decoder_layers": 2,
              "dim_feedforward": 32, "dtype": F64}
    torch_model = torch.nn.Transformer(**config, dropout=0.0, batch_first=True)
    ref_model = load_from(torch_model, reference.Transformer(**config))
    src, tgt = torch.randn(2, 9, 16, dtype=F64), torch.randn(2, 6, 16, dtype=F64)
    src_padding = torch.tensor([[False] * 9, [False] * 5 + [True] * 4])
    tgt_padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = not allowed
    expected = torch_model(src, tgt, tgt_mask=causal, src_key_padding_mask=src_padding,
                           tgt_key_padding_mask=tgt_padding, memory_key_padding_mask=src_padding,
                           tgt_is_causal=True)
    out = ref_model(src, tgt, src_key_padding_mask=src_padding, tgt_key_padding_mask=tgt_padding,
                    memory_key_padding_mask=src_padding, tgt_is_causal=True)
    close(out, expected)


def test_seq2seq_is_embeddings_transformer_and_projection():
    model = reference.Seq2Seq(11, 13, d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=16, pad_id=0, dtype=F64)
    torch_model = torch.nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True, dtype=F64)
    torch_model.load_state_dict(model.transformer.state_dict(), strict=True)
    src = torch.tensor([[5, 3, 2, 0], [7, 1, 0, 0]])
    tgt = torch.tensor([[1, 4, 6], [0, 2, 0]])  # a start token equal to pad_id is no padding
    logits = model(src, tgt)
    assert logits.shape == (2, 3, 13)

    def embed(ids, table):
        positions = reference.sinusoidal_positions(torch.arange(ids.shape[1]), 8)
        return table[ids] * math.sqrt(8) + positions

    hidden = torch_model(embed(src, model.src_embedding), embed(tgt, model.tgt_embedding),
                         tgt_mask=torch.ones(3, 3, dtype=torch.bool).triu(1),
                         src_key_padding_mask=src == 0,
                         tgt_key_padding_mask=torch.tensor([[False, False, False], [False, False, True]]),
                         memory_key_padding_mask=src == 0, tgt_is_causal=True)
    close(logits, model.output_projection(hidden))
