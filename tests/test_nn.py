"""fasttransformer.nn against its torch.nn namesakes: same weights, same outputs and gradients.

Equivalence runs in float64 (where both are exact to ~1e-15, any masking or layout mistake
shows), and in float32 under the accuracy rule against the float64 result. Rows that torch
turns into NaN (a query with no visible key, in its need_weights / inference paths) are
compared only where torch is finite; ours must be finite everywhere.
"""
import contextlib
import copy
import functools
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fasttransformer as ft
from accuracy import assert_within_torch_error
from conftest import DEVICES, HAS_CUDA

D_MODEL, NHEAD = 24, 3


def twins(torch_module, ours_class, *args, **kwargs):
    """``ours_class(*args)`` with the torch module's weights (loaded strictly)."""
    ours = ours_class(*args, **kwargs).to(next(torch_module.parameters()))
    ours.load_state_dict(torch_module.state_dict(), strict=True)
    ours.train(torch_module.training)
    return ours


def run_both(torch_module, ours, inputs, kwargs):
    """Outputs of both modules and the gradients of a random projection of them with respect to
    the float inputs and every parameter."""
    results = []
    grad_seed = torch.randint(0, 2**31, ()).item()
    for module in (torch_module, ours):
        module.zero_grad(set_to_none=True)
        args = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = module(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
        weights = weights.to(out.device)
        torch.nan_to_num(out * weights, nan=0.0).sum().backward()
        grads = {f"input{i}": a.grad for i, a in enumerate(args) if a.grad is not None}
        grads.update({name: p.grad for name, p in module.named_parameters() if p.grad is not None})
        results.append((out.detach(), grads))
    return results


def assert_same(torch_result, ours_result, tolerance=1e-10):
    (out_t, grads_t), (out_o, grads_o) = torch_result, ours_result
    assert torch.isfinite(out_o).all(), "fasttransformer gave non-finite values"
    finite = torch.isfinite(out_t)
    assert finite.any(), "the case compares nothing"
    torch.testing.assert_close(out_o[finite], out_t[finite], atol=tolerance, rtol=tolerance)
    if finite.all():
        assert grads_t.keys() == grads_o.keys()
        for name in grads_t:
            torch.testing.assert_close(grads_o[name], grads_t[name], atol=tolerance, rtol=tolerance, msg=name)


def masks(kind, batch, seqlen_q, seqlen_k, heads=NHEAD):
    """(attn_mask, key_padding_mask) in torch.nn's conventions (bool True = not allowed)."""
    attn_mask = key_padding_mask = None
    if "bool2d" in kind:
        attn_mask = torch.rand(seqlen_q, seqlen_k) < 0.3
    if "float2d" in kind:
        attn_mask = torch.randn(seqlen_q, seqlen_k, dtype=torch.float64)
    if "bool3d" in kind:
        attn_mask = torch.rand(batch * heads, seqlen_q, seqlen_k) < 0.3
    if "float3d" in kind:
        attn_mask = torch.randn(batch * heads, seqlen_q, seqlen_k, dtype=torch.float64)
    if "padding" in kind:  # the last sequence is fully padded
        key_padding_mask = torch.rand(batch, seqlen_k) < 0.3
        key_padding_mask[-1] = True
    if "floatpad" in kind:
        key_padding_mask = torch.zeros(batch, seqlen_k, dtype=torch.float64).masked_fill(
            torch.rand(batch, seqlen_k) < 0.3, float("-inf"))
    return attn_mask, key_padding_mask


MASK_KINDS = ["none", "bool2d", "float2d", "bool3d", "float3d", "padding", "floatpad", "bool2d+padding",
              "float3d+padding", "bool2d+floatpad"]


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_multihead_attention_matches_torch(kind, batch_first, need_weights):
    batch, seqlen_q, seqlen_k = 3, 7, 11
    torch_mha = torch.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=batch_first).double()
    ours = twins(torch_mha, ft.nn.MultiheadAttention, D_MODEL, NHEAD, batch_first=batch_first)
    query = torch.randn(batch, seqlen_q, D_MODEL, dtype=torch.float64)
    memory = torch.randn(batch, seqlen_k, D_MODEL, dtype=torch.float64)
    if not batch_first:
        query, memory = query.transpose(0, 1), memory.transpose(0, 1)
    attn_mask, key_padding_mask = masks(kind, batch, seqlen_q, seqlen_k)
    kwargs = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask, "need_weights": need_weights}
    assert_same(*run_both(torch_mha, ours, [query, memory, memory], kwargs))
    if need_weights:
        _, weights_t = torch_mha(query, memory, memory, **kwargs)
        _, weights_o = ours(query, memory, memory, **kwargs)
        finite = torch.isfinite(weights_t)
        torch.testing.assert_close(weights_o[finite], weights_t[finite], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("options", [
    {"kdim": 10, "vdim": 14}, {"add_bias_kv": True}, {"add_zero_attn": True},
    {"add_bias_kv": True, "add_zero_attn": True}, {"bias": False},
], ids=["kdim-vdim", "bias-kv", "zero-attn", "bias-kv+zero-attn", "no-bias"])
@pytest.mark.parametrize("kind", ["none", "bool2d+padding", "float3d"])
def test_multihead_attention_options_match_torch(options, kind):
    batch, seqlen_q, seqlen_k = 2, 5, 9
    torch_mha = torch.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True, **options).double()
    ours = twins(torch_mha, ft.nn.MultiheadAttention, D_MODEL, NHEAD, batch_first=True, **options)
    query = torch.randn(batch, seqlen_q, D_MODEL, dtype=torch.float64)
    key = torch.randn(batch, seqlen_k, options.get("kdim", D_MODEL), dtype=torch.float64)
    value = torch.randn(batch, seqlen_k, options.get("vdim", D_MODEL), dtype=torch.float64)
    attn_mask, key_padding_mask = masks(kind, batch, seqlen_q, seqlen_k)
    if key_padding_mask is not None:
        key_padding_mask[-1, 0] = False  # with extra keys torch keeps padded rows finite: keep one real key
    kwargs = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask, "need_weights": False}
    assert_same(*run_both(torch_mha, ours, [query, key, value], kwargs))


def test_multihead_attention_self_attention_unbatched_and_causal():
    torch_mha = torch.nn.MultiheadAttention(D_MODEL, NHEAD).double()
    ours = twins(torch_mha, ft.nn.MultiheadAttention, D_MODEL, NHEAD)
    x = torch.randn(9, D_MODEL, dtype=torch.float64)  # unbatched (L, E), query is key is value
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    for kwargs in ({}, {"attn_mask": causal, "is_causal": True, "need_weights": False},
                   {"attn_mask": torch.isneginf(causal), "is_causal": True, "need_weights": True},
                   {"key_padding_mask": torch.rand(9) < 0.3}):
        out_t, weights_t = torch_mha(x, x, x, **kwargs)
        out_o, weights_o = ours(x, x, x, **kwargs)
        torch.testing.assert_close(out_o, out_t, atol=1e-12, rtol=1e-12)
        assert (weights_t is None) == (weights_o is None)
        if weights_t is not None:
            torch.testing.assert_close(weights_o, weights_t, atol=1e-12, rtol=1e-12)
    out_t, weights_t = torch_mha(x, x, x, attn_mask=causal, average_attn_weights=False)
    out_o, weights_o = ours(x, x, x, attn_mask=causal, average_attn_weights=False)
    assert weights_o.shape == weights_t.shape == (NHEAD, 9, 9)
    torch.testing.assert_close(weights_o, weights_t, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("options", [{"add_bias_kv": True}, {"add_zero_attn": True}], ids=["bias-kv", "zero-attn"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_multihead_attention_is_causal_keeps_the_extra_keys(options, need_weights):
    """add_bias_kv / add_zero_attn with is_causal=True: every query sees the extra keys, as
    torch.nn computes it with the causal mask itself (is_causal=False) or with need_weights=True.
    torch's need_weights=False path drops them instead (its SDPA is_causal call leaves the
    appended keys above the diagonal): its own paths disagree, and this follows the mask."""
    torch_mha = torch.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True, **options).double().eval()
    ours = twins(torch_mha, ft.nn.MultiheadAttention, D_MODEL, NHEAD, batch_first=True, **options).eval()
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    expected = torch_mha(x, x, x, attn_mask=causal, need_weights=need_weights)
    got = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(got[0], expected[0], atol=1e-12, rtol=1e-12)
    if need_weights:
        torch.testing.assert_close(got[1], expected[1], atol=1e-12, rtol=1e-12)
    else:  # torch's fused causal path: the extra keys are gone, and the outputs differ
        dropped = torch_mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        assert not torch.allclose(dropped, expected[0])


def random_mask(kind, shape):
    """None, bool (True = not allowed, as torch.nn), float, or float with -inf entries."""
    if kind == "bool":
        return torch.rand(shape) < 0.3
    if kind == "float":
        return torch.randn(shape, dtype=torch.float64)
    if kind == "-inf":
        return torch.zeros(shape, dtype=torch.float64).masked_fill(torch.rand(shape) < 0.3, float("-inf"))
    return None


@st.composite
def multihead_attention_calls(draw):
    """A MultiheadAttention's options and one call's arguments, at random."""
    heads = draw(st.sampled_from([1, 2, 3]))
    self_attention = draw(st.booleans())
    kdim_vdim = not self_attention and draw(st.booleans())
    batched = draw(st.booleans())
    seqlen_q = draw(st.integers(1, 6))
    extra_keys = draw(st.sampled_from([(False, False), (True, False), (False, True), (True, True)]))
    return {
        "heads": heads, "embed_dim": heads * draw(st.sampled_from([4, 8])), "bias": draw(st.booleans()),
        "add_bias_kv": extra_keys[0], "add_zero_attn": extra_keys[1],
        "kdim": 5 if kdim_vdim else None, "vdim": 7 if kdim_vdim else None,
        "batch_first": draw(st.booleans()), "self_attention": self_attention,
        "batch": draw(st.integers(1, 3)) if batched else None, "seqlen_q": seqlen_q,
        "seqlen_k": seqlen_q if self_attention else draw(st.integers(1, 7)),
        "attn_mask": draw(st.sampled_from([None, "bool", "float", "-inf"])),
        "attn_mask_per_head": draw(st.booleans()),  # (B * H, Lq, Lk), or (H, Lq, Lk) unbatched
        "key_padding_mask": draw(st.sampled_from([None, "bool", "-inf"])),
        # a causal attn_mask (float or bool) instead, with the is_causal hint or without
        "causal": (self_attention and not any(extra_keys)
                   and draw(st.sampled_from([None, ("float", False), ("float", True), ("bool", True)]))),
        "need_weights": draw(st.booleans()), "average_attn_weights": draw(st.booleans()),
        "training": draw(st.booleans()), "grad": draw(st.booleans()),
    }


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(call=multihead_attention_calls())
def test_multihead_attention_random_calls_match_torch(call):
    """Random combinations of MultiheadAttention's options (bias, add_bias_kv, add_zero_attn,
    kdim/vdim, batch_first) and of a call's (batched or not, self- or cross-attention, bool /
    float / -inf masks in 2-D or per head, key padding, causal masks with and without the hint,
    need_weights, average_attn_weights, grad mode), against torch.nn in float64: outputs and
    weights (where torch's are finite), and the gradients when every output is finite."""
    heads, embed_dim, batch = call["heads"], call["embed_dim"], call["batch"]
    seqlen_q, seqlen_k = call["seqlen_q"], call["seqlen_k"]
    options = {name: call[name] for name in ("bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim", "batch_first")}
    torch_mha = torch.nn.MultiheadAttention(embed_dim, heads, **options).double().train(call["training"])
    if call["add_bias_kv"]:
        torch.nn.init.normal_(torch_mha.bias_k), torch.nn.init.normal_(torch_mha.bias_v)
    ours = twins(torch_mha, ft.nn.MultiheadAttention, embed_dim, heads, **options)

    def sequence(length, dim):
        x = torch.randn(batch or 1, length, dim, dtype=torch.float64)
        x = x if call["batch_first"] else x.transpose(0, 1)
        return x if batch else x.squeeze(0 if call["batch_first"] else 1)

    query = sequence(seqlen_q, embed_dim)
    key, value = ((query, query) if call["self_attention"] else
                  (sequence(seqlen_k, call["kdim"] or embed_dim), sequence(seqlen_k, call["vdim"] or embed_dim)))
    per_head = (heads * batch if batch else heads, seqlen_q, seqlen_k)
    attn_mask = random_mask(call["attn_mask"], per_head if call["attn_mask_per_head"] else (seqlen_q, seqlen_k))
    is_causal = False
    if call["causal"]:
        attn_mask = torch.nn.Transformer.generate_square_subsequent_mask(seqlen_q, dtype=torch.float64)
        attn_mask = attn_mask if call["causal"][0] == "float" else torch.isneginf(attn_mask)
        is_causal = call["causal"][1]
    key_padding_mask = random_mask(call["key_padding_mask"], (batch, seqlen_k) if batch else (seqlen_k,))
    kwargs = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask, "is_causal": is_causal,
              "need_weights": call["need_weights"], "average_attn_weights": call["average_attn_weights"]}
    with torch.set_grad_enabled(call["grad"]):
        out_t, weights_t = torch_mha(query, key, value, **kwargs)
        out_o, weights_o = ours(query, key, value, **kwargs)
    assert out_o.shape == out_t.shape and torch.isfinite(out_o).all()
    finite = torch.isfinite(out_t)
    torch.testing.assert_close(out_o[finite], out_t[finite], atol=1e-10, rtol=1e-10)
    assert (weights_o is None) == (weights_t is None)
    if weights_t is not None:
        assert weights_o.shape == weights_t.shape
        finite = torch.isfinite(weights_t)
        torch.testing.assert_close(weights_o[finite], weights_t[finite], atol=1e-10, rtol=1e-10)
    if call["grad"] and torch.isfinite(out_t).all():
        assert_same(*run_both(torch_mha, ours, [query, key, value], kwargs))


LAYER_KINDS = ["none", "bool2d", "float2d", "bool3d", "padding", "float2d+padding", "causal", "causal+padding"]


def layer_masks(kind, batch, seqlen):
    attn_mask, key_padding_mask = masks(kind.replace("causal", ""), batch, seqlen, seqlen)
    is_causal = "causal" in kind
    if is_causal:
        attn_mask = torch.nn.Transformer.generate_square_subsequent_mask(seqlen, dtype=torch.float64)
    return attn_mask, key_padding_mask, is_causal


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_encoder_layer_matches_torch(kind, batch_first, norm_first):
    batch, seqlen = 3, 8
    config = dict(dim_feedforward=40, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    torch_layer = torch.nn.TransformerEncoderLayer(D_MODEL, NHEAD, activation="gelu", **config).double()
    ours = twins(torch_layer, ft.nn.TransformerEncoderLayer, D_MODEL, NHEAD, activation="gelu", **config)
    src = torch.randn(batch, seqlen, D_MODEL, dtype=torch.float64)
    if not batch_first:
        src = src.transpose(0, 1)
    attn_mask, key_padding_mask, is_causal = layer_masks(kind, batch, seqlen)
    kwargs = {"src_mask": attn_mask, "src_key_padding_mask": key_padding_mask, "is_causal": is_causal}
    assert_same(*run_both(torch_layer, ours, [src], kwargs))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_decoder_layer_matches_torch(kind, batch_first, norm_first):
    batch, seqlen, seqlen_src = 3, 8, 6
    config = dict(dim_feedforward=40, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    torch_layer = torch.nn.TransformerDecoderLayer(D_MODEL, NHEAD, **config).double()
    ours = twins(torch_layer, ft.nn.TransformerDecoderLayer, D_MODEL, NHEAD, **config)
    tgt = torch.randn(batch, seqlen, D_MODEL, dtype=torch.float64)
    memory = torch.randn(batch, seqlen_src, D_MODEL, dtype=torch.float64)
    if not batch_first:
        tgt, memory = tgt.transpose(0, 1), memory.transpose(0, 1)
    tgt_mask, tgt_padding, is_causal = layer_masks(kind, batch, seqlen)
    _, memory_padding = masks("padding" if "padding" in kind else "none", batch, seqlen, seqlen_src)
    memory_mask = masks("bool2d", batch, seqlen, seqlen_src)[0] if kind == "bool2d" else None
    kwargs = {"tgt_mask": tgt_mask, "memory_mask": memory_mask, "tgt_key_padding_mask": tgt_padding,
              "memory_key_padding_mask": memory_padding, "tgt_is_causal": is_causal}
    assert_same(*run_both(torch_layer, ours, [tgt, memory], kwargs))


def left_aligned_padding(batch, seqlen):
    """True = padding, at the end of each sequence; the last sequence is fully padded."""
    lengths = torch.randint(1, seqlen, (batch,))
    lengths[-1] = 0
    return torch.arange(seqlen)[None, :] >= lengths[:, None]


# (case, torch takes its nested-tensor path): it then returns zeros at the padded positions
NESTED_CASES = [("eval-no-grad", True), ("not-left-aligned", False), ("training", False), ("grad", False),
                ("with-mask", False), ("nested-off", False), ("odd-heads", False), ("fastpath-off", False),
                ("float-padding", True)]


@pytest.mark.parametrize("case,nested", NESTED_CASES, ids=[case for case, _ in NESTED_CASES])
def test_encoder_padded_positions_as_torch_gives_them(case, nested):
    """torch.nn.TransformerEncoder's nested-tensor path (eval, no gradient, left-aligned padding,
    ...) returns zeros at the padded positions, before its final norm; its other paths compute
    them. Every position, padded ones included, must match torch's on each path."""
    batch, seqlen, heads = 4, 9, 3 if case == "odd-heads" else 4
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, heads, 40, dropout=0.0, batch_first=True).double()
    norm = torch.nn.LayerNorm(D_MODEL, dtype=torch.float64)
    torch.nn.init.normal_(norm.bias)  # the padded positions then come out as torch's norm(0) = bias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's advice on its nested-tensor path
        torch_encoder = torch.nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=case != "nested-off")
        ours = ft.nn.TransformerEncoder(copy.deepcopy(layer), 2, norm=copy.deepcopy(norm),
                                        enable_nested_tensor=case != "nested-off")
    ours.load_state_dict(torch_encoder.state_dict(), strict=True)
    for module in (torch_encoder, ours):
        module.train(case == "training")
    src = torch.randn(batch, seqlen, D_MODEL, dtype=torch.float64)
    padding = left_aligned_padding(batch, seqlen)
    if case == "not-left-aligned":
        padding[0, 0] = True
    if case == "with-mask":  # torch's layer then gives NaN everywhere, not only in the padded sequence
        padding[-1, 0] = False
    # bool (True = not allowed) with key 0 allowed: torch 2.13's layer fast path gives NaN for a float one
    if case == "float-padding":
        padding = torch.zeros(padding.shape, dtype=torch.float64).masked_fill(padding, float("-inf"))
    mask = None
    if case == "with-mask":
        mask = torch.rand(seqlen, seqlen) < 0.3
        mask[:, 0] = False
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(case != "fastpath-off")
    try:
        with torch.set_grad_enabled(case == "grad"):
            expected = torch_encoder(src, mask=mask, src_key_padding_mask=padding)
            out = ours(src, mask=mask, src_key_padding_mask=padding)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    padded = padding.bool() if padding.dtype == torch.bool else padding != 0
    torch_zeroed = torch.allclose(expected[padded], norm.bias.expand(int(padded.sum()), -1))
    assert torch_zeroed == nested, "the case does not take the torch path it names"
    assert torch.isfinite(out).all()
    finite = torch.isfinite(expected).all(-1)  # torch's computed fully padded sequence is NaN
    assert finite[:-1].all()
    torch.testing.assert_close(out[finite], expected[finite], atol=1e-10, rtol=1e-10)


def test_transformer_memory_padding_as_torch_gives_it():
    """Without a memory_key_padding_mask the decoder attends to the encoder's padded positions:
    in eval without gradients torch's encoder gives norm(0) there, so ours must too."""
    torch_model, ours = make_transformers(nhead=4)
    torch.nn.init.normal_(torch_model.encoder.norm.bias)
    ours.load_state_dict(torch_model.state_dict())
    torch_model.eval(), ours.eval()
    (src, tgt), _ = transformer_inputs()
    padding = left_aligned_padding(src.shape[0], src.shape[1])
    padding[-1, 0] = False  # torch's layers give NaN for a fully padded sequence: not compared here
    with torch.no_grad():
        expected = torch_model(src, tgt, src_key_padding_mask=padding)
        out = ours(src, tgt, src_key_padding_mask=padding)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@st.composite
def transformer_calls(draw):
    """A layer, stack or whole Transformer with random options, and one call's arguments."""
    heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "module": draw(st.sampled_from(["encoder-layer", "decoder-layer", "encoder", "decoder", "transformer"])),
        "heads": heads, "d_model": heads * 4, "dim_feedforward": draw(st.sampled_from([8, 20])),
        "activation": draw(st.sampled_from(["relu", "gelu", "silu", "ReLU()"])),  # names and callables
        "layer_norm_eps": draw(st.sampled_from([1e-5, 1e-2])), "batch_first": draw(st.booleans()),
        "norm_first": draw(st.booleans()), "bias": draw(st.booleans()), "num_layers": draw(st.integers(1, 2)),
        "final_norm": draw(st.booleans()), "enable_nested_tensor": draw(st.booleans()),
        "batch": draw(st.sampled_from([None, 1, 3])), "seqlen_src": draw(st.integers(1, 6)),
        "seqlen_tgt": draw(st.integers(1, 6)),
        # per attention (src, tgt, memory): None, a random mask kind, or "causal"/"causal-hint"
        "masks": [draw(st.sampled_from([None, "bool", "float", "-inf", "causal", "causal-hint"])) for _ in range(3)],
        # "end": each sequence's padding at its end, as torch's nested-tensor path needs (rarely
        # drawn with the rest of its conditions: test_encoder_padded_positions_as_torch_gives_them)
        "paddings": [draw(st.sampled_from([None, "bool", "-inf", "end"])) for _ in range(3)],
        "training": draw(st.booleans()), "grad": draw(st.booleans()), "fastpath": draw(st.booleans()),
    }


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(call=transformer_calls())
def test_transformer_modules_random_calls_match_torch(call):
    """Random options of the layers, stacks and Transformer (activation names and callables,
    layer_norm_eps, bias, norm_first, batch_first, final norm, nested tensors) and of a call's
    (batched or not, every mask kind per attention, causal masks with and without their hints,
    key padding, train/eval, grad mode, torch's fast path on or off), against torch.nn in
    float64: the output where torch's is finite, and the gradients when all of it is."""
    d_model, heads, batch = call["d_model"], call["heads"], call["batch"]
    activation = {"silu": torch.nn.functional.silu, "ReLU()": torch.nn.ReLU()}.get(call["activation"],
                                                                                    call["activation"])
    layer_options = {name: call[name] for name in ("dim_feedforward", "layer_norm_eps", "batch_first", "norm_first",
                                                   "bias")}
    layer_options.update(dropout=0.0, activation=activation)
    module, num_layers = call["module"], call["num_layers"]
    norm = torch.nn.LayerNorm(d_model, dtype=torch.float64) if call["final_norm"] else None
    if norm is not None:
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's advice on its nested-tensor path
        if module == "transformer":
            torch_module = torch.nn.Transformer(d_model, heads, num_layers, num_layers, **layer_options)
            ours = ft.nn.Transformer(d_model, heads, num_layers, num_layers, **layer_options)
        elif module.endswith("-layer"):
            name = "TransformerEncoderLayer" if module == "encoder-layer" else "TransformerDecoderLayer"
            torch_module = getattr(torch.nn, name)(d_model, heads, **layer_options)
            ours = getattr(ft.nn, name)(d_model, heads, **layer_options)
        else:
            name = "TransformerEncoder" if module == "encoder" else "TransformerDecoder"
            layer = getattr(torch.nn, name + "Layer")(d_model, heads, **layer_options)
            extra = {"enable_nested_tensor": call["enable_nested_tensor"]} if module == "encoder" else {}
            torch_module = getattr(torch.nn, name)(layer, num_layers, norm=norm, **extra)
            ours = getattr(ft.nn, name)(copy.deepcopy(layer), num_layers, norm=copy.deepcopy(norm), **extra)
    torch_module.double().train(call["training"])
    ours.double().train(call["training"]).load_state_dict(torch_module.state_dict(), strict=True)

    def sequence(length):
        x = torch.randn(batch or 1, length, d_model, dtype=torch.float64)
        x = x if call["batch_first"] else x.transpose(0, 1)
        return x if batch else x.squeeze(0 if call["batch_first"] else 1)

    def mask(kind, seqlen_q, seqlen_k):  # (attn_mask, is_causal hint)
        if kind in ("causal", "causal-hint") and seqlen_q == seqlen_k:
            causal = torch.nn.Transformer.generate_square_subsequent_mask(seqlen_q, dtype=torch.float64)
            return causal, kind == "causal-hint"
        return random_mask(kind, (seqlen_q, seqlen_k)), False

    def padding(kind, length):
        if kind == "end":
            padded = torch.arange(length) >= torch.randint(1, length + 1, (batch or 1, 1))
            return padded if batch else padded[0]
        return random_mask(kind, (batch, length) if batch else (length,))

    seqlen_src, seqlen_tgt = call["seqlen_src"], call["seqlen_tgt"]
    (src_mask, src_causal), (tgt_mask, tgt_causal), (memory_mask, memory_causal) = (
        mask(kind, seqlen_q, seqlen_k) for kind, seqlen_q, seqlen_k in
        zip(call["masks"], (seqlen_src, seqlen_tgt, seqlen_tgt), (seqlen_src, seqlen_tgt, seqlen_src)))
    src_padding, tgt_padding, memory_padding = (
        padding(kind, length) for kind, length in zip(call["paddings"], (seqlen_src, seqlen_tgt, seqlen_src)))
    src, tgt = sequence(seqlen_src), sequence(seqlen_tgt)
    decoder = {"memory_mask": memory_mask, "tgt_key_padding_mask": tgt_padding,
               "memory_key_padding_mask": memory_padding, "memory_is_causal": memory_causal}
    inputs, kwargs = {
        "encoder-layer": ([src], {"src_mask": src_mask, "src_key_padding_mask": src_padding, "is_causal": src_causal}),
        "encoder": ([src], {"mask": src_mask, "src_key_padding_mask": src_padding, "is_causal": src_causal}),
        "decoder-layer": ([tgt, src], {"tgt_mask": tgt_mask, "tgt_is_causal": tgt_causal, **decoder}),
        "decoder": ([tgt, src], {"tgt_mask": tgt_mask, "tgt_is_causal": tgt_causal, **decoder}),
        "transformer": ([src, tgt], {"src_mask": src_mask, "tgt_mask": tgt_mask, "src_key_padding_mask": src_padding,
                                     "src_is_causal": src_causal, "tgt_is_causal": tgt_causal, **decoder}),
    }[call["module"]]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(call["fastpath"])
    try:
        with torch.set_grad_enabled(call["grad"]):
            expected, out = torch_module(*inputs, **kwargs), ours(*inputs, **kwargs)
        finite = torch.isfinite(expected)
        assert out.shape == expected.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out[finite], expected[finite], atol=1e-9, rtol=1e-9)
        if call["grad"] and finite.all():
            assert_same(*run_both(torch_module, ours, inputs, kwargs), tolerance=1e-9)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def make_transformers(dtype=torch.float64, device="cpu", **config):
    config = {"d_model": D_MODEL, "nhead": NHEAD, "num_encoder_layers": 2, "num_decoder_layers": 2,
              "dim_feedforward": 40, "dropout": 0.0, "batch_first": True, **config}
    torch_model = torch.nn.Transformer(**config).to(device, dtype)
    return torch_model, twins(torch_model, ft.nn.Transformer, **config)


def transformer_inputs(batch=3, seqlen_src=9, seqlen_tgt=7, dtype=torch.float64, device="cpu"):
    src = torch.randn(batch, seqlen_src, D_MODEL, dtype=dtype, device=device)
    tgt = torch.randn(batch, seqlen_tgt, D_MODEL, dtype=dtype, device=device)
    src_padding = torch.rand(batch, seqlen_src, device=device) < 0.3
    src_padding[:, 0] = False
    kwargs = {"tgt_mask": torch.nn.Transformer.generate_square_subsequent_mask(seqlen_tgt, dtype=dtype, device=device),
              "src_key_padding_mask": src_padding, "memory_key_padding_mask": src_padding}
    return [src, tgt], kwargs


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_transformer_matches_torch(training, norm_first):
    torch_model, ours = make_transformers(norm_first=norm_first)
    torch_model.train(training), ours.train(training)
    inputs, kwargs = transformer_inputs()
    assert_same(*run_both(torch_model, ours, inputs, kwargs))
    # the other way round too: torch loads fasttransformer's state_dict strictly
    torch.nn.Transformer(D_MODEL, NHEAD, 2, 2, 40, batch_first=True).double().load_state_dict(
        ours.state_dict(), strict=True)


def test_transformer_float32_within_torch_error():
    torch_model, ours = make_transformers()
    inputs, kwargs = transformer_inputs()
    reference = torch_model(*inputs, **kwargs)
    torch_model.float(), ours.float()
    inputs32 = [x.float() for x in inputs]
    kwargs32 = {**kwargs, "tgt_mask": kwargs["tgt_mask"].float()}
    assert_within_torch_error(ours(*inputs32, **kwargs32), reference, torch_model(*inputs32, **kwargs32))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_on_triton_kernels_within_torch_error(monkeypatch, norm_first):
    """The layers on the Triton kernels (on the GPU when there is one, else under the
    interpreter): projections give strided q/k/v views, masks arrive as key padding and
    is_causal. Forward and gradients."""
    monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention",
                        functools.partial(ft.ops.scaled_dot_product_attention, backend="triton"))
    device = "cuda" if HAS_CUDA else "cpu"
    torch_model, ours = make_transformers(norm_first=norm_first, device=device)
    inputs, kwargs = transformer_inputs(device=device)
    kwargs["tgt_key_padding_mask"] = torch.rand(3, 7, device=device) < 0.2
    (reference, reference_grads), _ = run_both(torch_model, copy.deepcopy(torch_model), inputs, kwargs)
    torch_model.float(), ours.float()
    inputs32 = [x.float() for x in inputs]
    kwargs32 = {**kwargs, "tgt_mask": kwargs["tgt_mask"].float()}
    (out_t, grads_t), (out_o, grads_o) = run_both(torch_model, ours, inputs32, kwargs32)
    finite = torch.isfinite(reference)
    assert_within_torch_error(out_o[finite], reference[finite], out_t[finite])
    magnitude = max(g.abs().max().item() for g in reference_grads.values())
    for name, grad in reference_grads.items():
        assert_within_torch_error(grads_o[name], grad, grads_t[name], factor=3.0, what=name, magnitude=magnitude)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
def test_transformer_forward_mode_on_triton_kernels_within_torch_error(monkeypatch):
    """torch.func.jvp through a whole Transformer on the Triton kernels (the JVP kernel, under
    the interpreter on the CPU): the output's tangent within 3x torch's float32 error against the
    float64 reference, both of torch's through its math backend (its CPU flash kernel, which
    torch.nn.Transformer takes in eval, has no forward-mode derivative and raises)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention",
                        functools.partial(ft.ops.scaled_dot_product_attention, backend="triton"))
    device = "cuda" if HAS_CUDA else "cpu"
    torch_model, ours = make_transformers(device=device)
    inputs, kwargs = transformer_inputs(device=device)
    tangents = [torch.randn_like(x) for x in inputs]

    def tangent(model, dtype):
        model = copy.deepcopy(model).to(dtype).eval()
        call_kwargs = {**kwargs, "tgt_mask": kwargs["tgt_mask"].to(dtype), "tgt_is_causal": True}
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(lambda src, tgt: model(src, tgt, **call_kwargs),
                                  tuple(x.to(dtype) for x in inputs), tuple(t.to(dtype) for t in tangents))[1]

    reference = tangent(torch_model, torch.float64)
    assert_within_torch_error(tangent(ours, torch.float32), reference, tangent(torch_model, torch.float32),
                              factor=3.0, what="output tangent")


def test_masks_reach_the_op_in_their_cheapest_form(monkeypatch):
    """A key-padding mask arrives as (B, Lk), a square causal mask as is_causal: never dense."""
    calls = []
    real_op = ft.nn.attention.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append({"attn_mask": attn_mask, "is_causal": is_causal, **kwargs})
        return real_op(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention", spy)
    _, ours = make_transformers()
    inputs, kwargs = transformer_inputs()
    kwargs["tgt_key_padding_mask"] = torch.zeros(3, 7, dtype=torch.bool)
    ours(*inputs, **kwargs)
    assert len(calls) == 2 + 2 * 2  # encoder self-attention, decoder self- and cross-attention
    for call in calls:
        assert call["key_padding_mask"] is not None and call["key_padding_mask"].shape in {(3, 9), (3, 7)}
        assert call["attn_mask"] is None
    assert [call["is_causal"] for call in calls] == [False, False, True, False, True, False]


class Nested(torch.nn.Module):
    """A user model that nests the torch.nn layers (and a subclass, which must be left alone)."""

    class OwnAttention(torch.nn.MultiheadAttention):
        pass

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(D_MODEL, NHEAD, 40, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(D_MODEL, D_MODEL))])
        self.pool = torch.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True)
        self.own = self.OwnAttention(D_MODEL, NHEAD, batch_first=True)

    def forward(self, x, padding):
        x = self.blocks[0](self.encoder(x, src_key_padding_mask=padding))
        x = self.pool(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        return self.own(x, x, x, key_padding_mask=padding, need_weights=False)[0]


def test_convert_nested_model_in_place_and_training_matches():
    original = Nested().double()
    converted = copy.deepcopy(original)
    parameters_before = [id(p) for p in converted.parameters()]
    assert ft.convert(converted) is converted
    assert [id(p) for p in converted.parameters()] == parameters_before  # shared, not copied
    assert type(converted.pool) is ft.nn.MultiheadAttention
    assert type(converted.encoder) is ft.nn.TransformerEncoder
    assert all(type(layer) is ft.nn.TransformerEncoderLayer for layer in converted.encoder.layers)
    assert type(converted.encoder.layers[0].self_attn) is ft.nn.MultiheadAttention
    assert type(converted.own) is Nested.OwnAttention  # a user subclass keeps its class
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (original, converted)]
    for step in range(3):
        x = torch.randn(4, 10, D_MODEL, dtype=torch.float64)
        padding = torch.rand(4, 10) < 0.3
        padding[:, 0] = False
        losses = []
        for model, optimizer in zip((original, converted), optimizers):
            loss = model(x, padding).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-10), f"step {step}"
    for p_original, p_converted in zip(original.parameters(), converted.parameters()):
        torch.testing.assert_close(p_converted, p_original, atol=1e-10, rtol=1e-10)


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        ft.convert("model")


def test_save_load_round_trip(tmp_path):
    _, ours = make_transformers()
    inputs, kwargs = transformer_inputs()
    expected = ours(*inputs, **kwargs)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is ft.nn.Transformer
    torch.testing.assert_close(loaded(*inputs, **kwargs), expected, atol=0, rtol=0)
    path = tmp_path / "weights.pt"
    torch.save(ours.state_dict(), path)
    fresh = ft.nn.Transformer(D_MODEL, NHEAD, 2, 2, 40, dropout=0.0, batch_first=True).double()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    torch.testing.assert_close(fresh(*inputs, **kwargs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bfloat16_matches_torch(device):
    """On CUDA this runs the Triton kernels in bfloat16 (the interpreter cannot, on the CPU)."""
    torch_model, ours = make_transformers(dtype=torch.float32, device=device)
    inputs, kwargs = transformer_inputs(dtype=torch.float32, device=device)
    reference = torch_model.double()(*[x.double() for x in inputs],
                                     **{**kwargs, "tgt_mask": kwargs["tgt_mask"].double()})
    torch_model.float()
    with torch.autocast(device, dtype=torch.bfloat16):
        out_t = torch_model(*inputs, **kwargs)
        out_o = ours(*inputs, **kwargs)
    assert out_o.dtype == out_t.dtype
    assert_within_torch_error(out_o.float(), reference, out_t.float())


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    layer = ft.nn.TransformerEncoderLayer(D_MODEL, NHEAD, 40, dropout=0.0, batch_first=True).to(device)
    x = torch.randn(3, 9, D_MODEL, device=device)
    padding = torch.rand(3, 9, device=device) < 0.3
    padding[:, 0] = False
    eager = layer(x, src_key_padding_mask=padding, is_causal=True)
    compiled_layer = torch.compile(layer, fullgraph=True)
    compiled = compiled_layer(x, src_key_padding_mask=padding, is_causal=True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # Under autocast too (the op's autocast check once broke the graph on torch 2.11).
    with torch.autocast(device, dtype=torch.bfloat16):
        eager = layer(x, src_key_padding_mask=padding, is_causal=True)
        compiled = compiled_layer(x, src_key_padding_mask=padding, is_causal=True)
    assert compiled.dtype == eager.dtype
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic-sizes"])
def test_export_on_triton_kernels_matches_eager(monkeypatch, symbolic):
    """torch.export.export of a whole model: the attention is the custom op in the exported graph
    (its fake implementation gives the shapes), and the exported program computes what eager does.
    With the batch and both lengths symbolic, nothing in the layers or the op specialises on them:
    the one program runs batches of other sizes and lengths. The batch needs no bound: above
    65535 sequences the kernels launch once per 65535, and they check at each call the sizes
    they cannot hold (an export keeps no guard on B * H * Lq)."""
    monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention",
                        functools.partial(ft.ops.scaled_dot_product_attention, backend="triton"))
    device = "cuda" if HAS_CUDA else "cpu"
    _, model = make_transformers(dtype=torch.float32, device=device, nhead=4)
    model.eval()
    (src, tgt), kwargs = transformer_inputs(dtype=torch.float32, device=device)
    kwargs["tgt_is_causal"] = True
    dynamic_shapes = None
    if symbolic:
        batch, source, target = torch.export.Dim("B"), torch.export.Dim("S", max=4096), torch.export.Dim("T", max=4096)
        dynamic_shapes = {"src": {0: batch, 1: source}, "tgt": {0: batch, 1: target},
                          "tgt_mask": {0: target, 1: target}, "src_key_padding_mask": {0: batch, 1: source},
                          "memory_key_padding_mask": {0: batch, 1: source}, "tgt_is_causal": None}
    program = torch.export.export(model, (src, tgt), kwargs, dynamic_shapes=dynamic_shapes)
    launches = [node for node in program.graph.nodes if "fasttransformer.attention_forward" in str(node.target)]
    assert len(launches) == 6  # 2 encoder, 2 decoder self- and 2 cross-attention layers
    for size in [(3, 9, 7)] + ([(2, 13, 5), (5, 6, 11)] if symbolic else []):
        (src, tgt), kwargs = transformer_inputs(*size, dtype=torch.float32, device=device)
        kwargs["tgt_is_causal"] = True
        torch.testing.assert_close(program.module()(src, tgt, **kwargs), model(src, tgt, **kwargs), atol=1e-6,
                                   rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_equals_full_recomputation(device):
    layer = ft.nn.TransformerDecoderLayer(D_MODEL, NHEAD, 40, dropout=0.0, batch_first=True).double().to(device)
    decoder = ft.nn.TransformerDecoder(layer, 2).eval()
    tgt = torch.randn(2, 9, D_MODEL, dtype=torch.float64, device=device)
    memory = torch.randn(2, 5, D_MODEL, dtype=torch.float64, device=device)
    padding = torch.zeros(2, 5, dtype=torch.bool, device=device)
    padding[1, 3:] = True
    full = decoder(tgt, memory, memory_key_padding_mask=padding, tgt_is_causal=True)
    cache = ft.nn.DecoderCache(2, capacity=9)
    pieces = []
    for start, stop in ((0, 4), (4, 5), (5, 9)):  # a prompt, one token, then several at once
        pieces.append(decoder(tgt[:, start:stop], memory, memory_key_padding_mask=padding, tgt_is_causal=True,
                              cache=cache))
        assert cache.length == stop
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=1e-12)
    with pytest.raises(RuntimeError, match="KVCache is full"):
        decoder(tgt[:, :1], memory, tgt_is_causal=True, cache=cache)


def test_kv_cache_on_triton_kernels_equals_full_recomputation(monkeypatch):
    """Decoding with a cache on the Triton kernels (on the GPU when there is one, else under the
    interpreter): the keys and values are views of the cache's capacity buffer (their batch and
    head strides span unused positions), new queries see the cached keys lower-right aligned,
    and the target padding mask covers every cached key. Chunks: a prompt, one token, several."""
    calls = []

    def triton_attention(*args, **kwargs):
        calls.append(args[1].stride())
        return ft.ops.scaled_dot_product_attention(*args, **kwargs, backend="triton")

    device = "cuda" if HAS_CUDA else "cpu"
    layer = ft.nn.TransformerDecoderLayer(D_MODEL, NHEAD, 40, dropout=0.0, batch_first=True).to(device)
    decoder = ft.nn.TransformerDecoder(layer, 2).eval()
    tgt = torch.randn(3, 9, D_MODEL, device=device)
    memory = torch.randn(3, 5, D_MODEL, device=device)
    memory_padding = torch.zeros(3, 5, dtype=torch.bool, device=device)
    memory_padding[1, 3:] = True
    tgt_padding = torch.zeros(3, 9, dtype=torch.bool, device=device)
    tgt_padding[2, :2] = True  # left padding: the first two positions of the last sequence
    kwargs = {"memory_key_padding_mask": memory_padding, "tgt_is_causal": True}
    with torch.no_grad():  # on torch's kernels, in float64
        reference = copy.deepcopy(decoder).double()(tgt.double(), memory.double(), tgt_key_padding_mask=tgt_padding,
                                                    **kwargs)
    monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention", triton_attention)
    with torch.no_grad():
        full = decoder(tgt, memory, tgt_key_padding_mask=tgt_padding, **kwargs)
        cache = ft.nn.DecoderCache(2, capacity=12)
        pieces = [decoder(tgt[:, start:stop], memory, tgt_key_padding_mask=tgt_padding[:, :stop], cache=cache, **kwargs)
                  for start, stop in ((0, 4), (4, 5), (5, 9))]
    capacity_strides = [stride for stride in calls[len(calls) // 2:] if stride[1] == 12 * (D_MODEL // NHEAD)]
    assert capacity_strides, "no call read the cache's buffer"
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=2e-5)
    assert (torch.cat(pieces, dim=1).double() - reference).abs().max() < 1e-4


def test_decoding_builds_the_memory_padding_lists_once(monkeypatch):
    """On the Triton kernels, a DecoderCache's cross-attention builds the tile lists of the memory
    padding mask once for every layer and step (they are the same), and gives the outputs that
    building them at every call gives, bit for bit. A new memory padding mask (a new batch) gets
    its own lists."""
    import fasttransformer.kernels.block_lists as block_list_kernels

    builds = []
    build = block_list_kernels._build_block_lists
    monkeypatch.setattr(block_list_kernels, "_build_block_lists", lambda *args: builds.append(args) or build(*args))
    monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention",
                        functools.partial(ft.ops.scaled_dot_product_attention, backend="triton"))
    device = "cuda" if HAS_CUDA else "cpu"
    layer = ft.nn.TransformerDecoderLayer(D_MODEL, NHEAD, 40, dropout=0.0, batch_first=True).to(device)
    decoder = ft.nn.TransformerDecoder(layer, 3).eval()
    tgt = torch.randn(3, 5, D_MODEL, device=device)
    memory = torch.randn(3, 40, D_MODEL, device=device)
    memory_padding = torch.zeros(3, 40, dtype=torch.bool, device=device)
    memory_padding[0, 20:], memory_padding[2, 7:] = True, True

    def decode(padding):
        cache = ft.nn.DecoderCache(3, capacity=5)
        with torch.no_grad():
            return torch.cat([decoder(tgt[:, step:step + 1], memory, memory_key_padding_mask=padding,
                                      tgt_is_causal=True, cache=cache) for step in range(5)], dim=1)

    reused = decode(memory_padding)
    assert len(builds) == 1, f"{len(builds)} builds for 3 layers x 5 steps"
    with monkeypatch.context() as patch:  # built at every call
        patch.setattr(ft.nn.attention, "reusing_block_lists", lambda store: contextlib.nullcontext())
        assert torch.equal(decode(memory_padding), reused) and len(builds) == 1 + 3 * 5
    other = memory_padding.clone()
    other[1, 30:] = True
    changed = decode(other)
    assert len(builds) == 1 + 3 * 5 + 1 and not torch.equal(changed[1], reused[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decoder_only_kv_cache_equals_full_recomputation(monkeypatch, backend):
    """A decoder-only model (causal encoder layers, pre- and post-norm) decoding with a
    DecoderCache: a prompt, one token, then several, with left padding, give what the whole
    sequence gives at once. torch's kernels in float64 (exact), the Triton kernels in float32
    (on the GPU when there is one, else under the interpreter) against the float64 result."""
    device = "cuda" if HAS_CUDA and backend == "triton" else "cpu"
    dtype = torch.float64 if backend == "torch" else torch.float32
    layers = [ft.nn.TransformerEncoderLayer(D_MODEL, NHEAD, 40, dropout=0.0, batch_first=True, norm_first=norm_first)
              for norm_first in (False, True)]
    stack = ft.nn.TransformerEncoder(layers[0], 2, norm=torch.nn.LayerNorm(D_MODEL), enable_nested_tensor=False)
    stack.layers[1] = layers[1]
    stack = stack.to(device, torch.float64).eval()
    x = torch.randn(3, 9, D_MODEL, dtype=torch.float64, device=device)
    padding = torch.zeros(3, 9, dtype=torch.bool, device=device)
    padding[1, :3] = True  # left padding
    with torch.no_grad():
        reference = stack(x, src_key_padding_mask=padding, is_causal=True)
    if backend == "triton":
        monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention",
                            functools.partial(ft.ops.scaled_dot_product_attention, backend="triton"))
    stack, x = stack.to(dtype), x.to(dtype)
    cache = ft.nn.DecoderCache(2, capacity=10)
    with torch.no_grad():
        pieces = [stack(x[:, start:stop], src_key_padding_mask=padding[:, :stop], is_causal=True, cache=cache)
                  for start, stop in ((0, 4), (4, 5), (5, 9))]
    assert cache.length == 9
    out = torch.cat(pieces, dim=1)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.double(), reference, atol=tolerance, rtol=tolerance)
    with pytest.raises(ValueError, match="cache has 2 layers, the stack 1"):
        ft.nn.TransformerEncoder(layers[0], 1)(x[:, :1], is_causal=True, cache=ft.nn.DecoderCache(2, 4))
    with pytest.raises(TypeError, match="cache must be a fasttransformer.nn.DecoderCache"):
        stack(x[:, :1], is_causal=True, cache=[ft.nn.KVCache(4)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cache_reorder_and_crop_equal_full_recomputation(monkeypatch, backend):
    """Beam search and speculative decoding on a DecoderCache: ``reorder`` keeps the sequences an
    index picks (repeats, another batch size), the projected memory and its padding with them;
    ``crop`` forgets rejected positions. Decoding on equals running the decoder on the whole
    reordered (or accepted) sequences: torch's kernels in float64, the Triton ones in float32."""
    device = "cuda" if HAS_CUDA and backend == "triton" else "cpu"
    dtype = torch.float64 if backend == "torch" else torch.float32
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    if backend == "triton":
        monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention",
                            functools.partial(ft.ops.scaled_dot_product_attention, backend="triton"))
    layer = ft.nn.TransformerDecoderLayer(D_MODEL, NHEAD, 40, dropout=0.0, batch_first=True)
    decoder = ft.nn.TransformerDecoder(layer, 2).to(device, dtype).eval()
    tgt, memory = (torch.randn(3, length, D_MODEL, dtype=dtype, device=device) for length in (9, 6))
    padding = torch.zeros(3, 6, dtype=torch.bool, device=device)
    padding[1, 4:] = True
    padding[2, 2:] = True

    def full(tgt_, index):  # the decoder on whole sequences, the memory picked by index
        return decoder(tgt_, memory[index], memory_key_padding_mask=padding[index], tgt_is_causal=True)

    index = torch.tensor([2, 0, 0, 1], device=device)
    beams = torch.cat([tgt[index, :4], torch.randn(4, 3, D_MODEL, dtype=dtype, device=device)], dim=1)
    cache = ft.nn.DecoderCache(2, capacity=9)
    with torch.no_grad():
        decoder(tgt[:, :4], memory, memory_key_padding_mask=padding, tgt_is_causal=True, cache=cache)
        assert bool(cache.cross_attn[0].block_lists) == (backend == "triton")  # the memory padding's tile lists
        cache.reorder(index)
        assert cache.length == 4 and not cache.cross_attn[0].block_lists  # those of the old rows are let go
        pieces = [decoder(beams[:, start:stop], memory, memory_key_padding_mask=padding[index], tgt_is_causal=True,
                          cache=cache) for start, stop in ((4, 5), (5, 7))]  # the memory argument is ignored now
        torch.testing.assert_close(torch.cat(pieces, dim=1), full(beams, index)[:, 4:], atol=tolerance,
                                   rtol=tolerance)
        cache.crop(5)  # the last two positions rejected: two others instead
        accepted = torch.cat([beams[:, :5], torch.randn(4, 2, D_MODEL, dtype=dtype, device=device)], dim=1)
        step = decoder(accepted[:, 5:], memory, memory_key_padding_mask=padding[index], tgt_is_causal=True,
                       cache=cache)
        assert cache.length == 7
        torch.testing.assert_close(step, full(accepted, index)[:, 5:], atol=tolerance, rtol=tolerance)


def test_cache_reorder_and_crop_reject_bad_arguments():
    """Errors name the argument and leave the cache as it was."""
    cache = ft.nn.DecoderCache(2, capacity=6)
    with pytest.raises(RuntimeError, match="holds nothing yet"):
        cache.reorder(torch.tensor([0]))
    for layer in cache.self_attn:
        layer.update(torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8))
    before = [layer.key.clone() for layer in cache.self_attn]
    for index, error, pattern in ((torch.tensor([[0]]), TypeError, "1-D int64 or int32"),
                                  (torch.tensor([0.0]), TypeError, "1-D int64 or int32"), ([0, 1], TypeError, "list"),
                                  (torch.tensor([0, 3]), IndexError, r"0..3, outside the cache's batch \[0, 3\)"),
                                  (torch.tensor([-1, 2]), IndexError, "-1..2"),
                                  (torch.tensor([], dtype=torch.int64), ValueError, "at least one"),
                                  (torch.tensor([0], device="meta"), ValueError, "index is on meta")):
        with pytest.raises(error, match=pattern):
            cache.reorder(index)
    for length in (5, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"length must be an int in \[0, 4\]"):
            cache.crop(length)
    with pytest.raises(RuntimeError, match="a static cache holds the encoder memory"):
        ft.nn.KVCache(static=True).crop(0)
    # the first 4 positions: the capacity's other 2 were never written (NaN garbage != itself)
    assert all(layer.length == 4 and torch.equal(layer.key[:, :, :4], key[:, :, :4])
               for layer, key in zip(cache.self_attn, before))
    cache.reorder(torch.tensor([1], dtype=torch.int32))
    assert [tuple(layer.key.shape) for layer in cache.self_attn] == [(1, 2, 6, 8)] * 2
    assert all(torch.equal(layer.key[:, :, :4], key[1:2, :, :4]) for layer, key in zip(cache.self_attn, before))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_decoding_with_a_cache_matches_eager(monkeypatch, backend):
    """torch.compile(fullgraph=True) of a decoder-only stack decoding with a DecoderCache: a
    prompt, one token, then a chunk of several (chunked prefill: lower-right causal, which eager
    calls pass as a CausalBias, an object dynamo cannot build) give what eager calls give, on
    torch's kernels and on the Triton ones (the interpreter here, the GPU there)."""
    device = "cuda" if HAS_CUDA and backend == "triton" else "cpu"
    if backend == "triton":
        monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention",
                            functools.partial(ft.ops.scaled_dot_product_attention, backend="triton"))
    layer = ft.nn.TransformerEncoderLayer(D_MODEL, NHEAD, 40, dropout=0.0, batch_first=True, norm_first=True)
    stack = ft.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(device).eval()
    x = torch.randn(2, 9, D_MODEL, device=device)
    padding = torch.zeros(2, 9, dtype=torch.bool, device=device)
    padding[1, :2] = True  # left padding

    def decode(model):
        cache = ft.nn.DecoderCache(2, capacity=9)
        with torch.no_grad():
            return torch.cat([model(x[:, start:stop], src_key_padding_mask=padding[:, :stop], is_causal=True,
                                    cache=cache) for start, stop in ((0, 4), (4, 5), (5, 9))], dim=1)

    torch._dynamo.reset()
    compiled = decode(torch.compile(stack, fullgraph=True, backend="aot_eager"))  # dynamo's trace is the point
    torch.testing.assert_close(compiled, decode(stack), atol=1e-5, rtol=1e-5)


def test_self_attention_decoding_step_projects_q_k_v_in_one_matmul():
    """With a cache, self-attention still projects q, k and v with one matmul (in_proj_weight),
    and appends k and v to the cache with one copy: a decoding step is launch-bound on a GPU,
    and the separate q and k/v projections, or k and v copies, cost one more launch per layer
    and step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        count = copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                CountMatmuls.count += 1
            CountMatmuls.copies += func.overloadpacket == torch.ops.aten.copy_
            return func(*args, **(kwargs or {}))

    mha = ft.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True).eval()
    cache = ft.nn.KVCache(capacity=6)
    x = torch.randn(2, 6, D_MODEL)
    first, last = x[:, :5], x[:, 5:]  # self-attention: query, key and value are one tensor
    with torch.no_grad():
        prompt = mha(first, first, first, need_weights=False, is_causal=True, cache=cache)[0]
        with CountMatmuls():
            step = mha(last, last, last, need_weights=False, is_causal=True, cache=cache)[0]
        full = mha(x, x, x, need_weights=False, is_causal=True)[0]
    assert CountMatmuls.count == 2  # the q/k/v projection and out_proj (the attention is one SDPA op)
    assert CountMatmuls.copies == 1  # the new k and v into the cache
    torch.testing.assert_close(torch.cat([prompt, step], 1), full, atol=1e-6, rtol=1e-6)


def test_kv_cache_appends_stacked_keys_and_values_in_one_copy():
    """The cache keeps keys and values in one (B, 2H, capacity, D) buffer: ``update_stacked``
    (what a self-attention layer calls with its projection's k and v) appends both with one copy
    (one launch a layer and step on a GPU), ``update`` with two. Mixed, in any order, the cache
    returns what it was given; a static cache takes stacked ones too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket == torch.ops.aten.copy_
            return func(*args, **(kwargs or {}))

    cache = ft.nn.KVCache(capacity=7)
    given = []
    for length, stacked in ((3, True), (1, False), (2, True), (1, False)):
        qkv = torch.randn(2, length, 3 * 4 * 8).unflatten(-1, (-1, 8)).transpose(1, 2)  # as MultiheadAttention's
        with CountCopies() as counter:
            keys, values = cache.update_stacked(qkv[:, 4:]) if stacked else cache.update(qkv[:, 4:8], qkv[:, 8:])
        assert counter.count == (1 if stacked else 2)
        given.append(qkv[:, 4:].clone())
    assert cache.length == 7 and keys.shape == values.shape == (2, 4, 7, 8)
    assert cache.value.data_ptr() == cache.key.data_ptr() + 4 * 7 * 8 * cache.key.element_size()  # one buffer
    torch.testing.assert_close(torch.cat([keys, values], 1), torch.cat(given, 2), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="KVCache is full: 7 \\+ 1"):
        cache.update_stacked(given[-1])
    other = ft.nn.KVCache(capacity=9)
    other.update_stacked(given[0])
    with pytest.raises(ValueError, match="KVCache holds keys of .* = \\(2, 4, 8\\).* new ones are \\(2, 3, 8\\)"):
        other.update_stacked(torch.randn(2, 6, 1, 8))  # 3 heads of keys, 3 of values
    assert other.length == 3
    static = ft.nn.KVCache(static=True)
    keys, values = static.update_stacked(given[0])
    assert keys.data_ptr() == given[0].data_ptr() and torch.equal(values, given[0][:, 4:])
    for bad in (torch.randn(2, 3, 1, 8), torch.randn(2, 4, 8)):
        with pytest.raises(ValueError, match="stacked as \\(B, 2H, L_new, D\\)"):
            ft.nn.KVCache(capacity=2).update_stacked(bad)
    with pytest.raises(ValueError, match="key and value of one dtype"):
        ft.nn.KVCache(capacity=2).update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8, dtype=torch.float64))


def test_kv_cache_rejects_other_sequences():
    """A cache serves one batch of sequences: new keys of another batch size, head count, head
    dim, dtype or device are an error naming the cache (the copy into its buffer would fail
    with torch's shape message, or cast silently)."""
    cache = ft.nn.KVCache(capacity=8)
    cache.update(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8))
    for shape, dtype in (((3, 3, 1, 8), torch.float32), ((2, 1, 1, 8), torch.float32),
                         ((2, 3, 1, 16), torch.float32), ((2, 3, 1, 8), torch.float64)):
        with pytest.raises(ValueError, match="KVCache holds keys of"):
            cache.update(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
    with pytest.raises(ValueError, match="key and value of one shape"):
        cache.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 2, 8))
    assert cache.length == 4
    key, value = cache.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    assert key.shape == value.shape == (2, 3, 5, 8)


def test_a_decoding_call_that_raises_leaves_the_cache_as_it_was():
    """Bad masks in a decoding step are refused before the new keys go into the cache: the
    caller can fix the call and go on (the keys once went in first, and the op's error came
    after, leaving a cache one step ahead). Self-attention and a static cross-attention cache."""
    mha = ft.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True).eval()
    x, memory = torch.randn(2, 6, D_MODEL), torch.randn(2, 5, D_MODEL)
    cache, static = ft.nn.KVCache(capacity=6), ft.nn.KVCache(static=True)
    with torch.no_grad():
        mha(x[:, :3], x[:, :3], x[:, :3], need_weights=False, is_causal=True, cache=cache)
        mha(x[:, :1], memory, memory, need_weights=False, cache=static)
        step_input = x[:, 3:4]
        for masks_ in ({"key_padding_mask": torch.zeros(2, 1, dtype=torch.bool)},  # the new position only
                       {"attn_mask": torch.zeros(1, 1)}, {"attn_mask": torch.zeros(2 * NHEAD, 1, 3)},
                       {"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool, device="meta")}):
            with pytest.raises(ValueError, match="key_padding_mask|attn_mask"):
                mha(step_input, step_input, step_input, need_weights=False, is_causal="attn_mask" not in masks_,
                    cache=cache, **masks_)
            assert cache.length == 3
        # A static cache's keys are the memory's, projected on its first call: later key/value
        # arguments are ignored, so their length does not count.
        with pytest.raises(ValueError, match=r"key_padding_mask must be \(batch, the cached length\) = \(2, 5\)"):
            mha(x[:, 1:2], memory, memory, need_weights=False, cache=static,
                key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
        mha(x[:, 1:2], x[:, :1], x[:, :1], need_weights=False, cache=static,
            key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
        padding = torch.zeros(2, 4, dtype=torch.bool)
        padding[1, 0] = True
        step = mha(x[:, 3:4], x[:, 3:4], x[:, 3:4], key_padding_mask=padding, need_weights=False, is_causal=True,
                   cache=cache)[0]
        full = mha(x[:, :4], x[:, :4], x[:, :4], key_padding_mask=padding, need_weights=False, is_causal=True)[0]
    assert cache.length == 4
    torch.testing.assert_close(step, full[:, 3:], atol=1e-6, rtol=1e-6)


def test_bad_inputs_name_the_argument():
    mha = ft.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True)
    x = torch.randn(2, 5, D_MODEL)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be"):
        mha(x, x, x, attn_mask=torch.zeros(5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating"):
        mha(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="query's last dim is 7"):
        mha(torch.randn(2, 5, 7), x, x)
    with pytest.raises(ValueError, match="key is 2-D but query is 3-D"):
        mha(x, x[0], x)
    with pytest.raises(ValueError, match="batch sizes differ"):
        mha(x, x[:1], x[:1])
    with pytest.raises(TypeError, match="cache must be a fasttransformer.nn.KVCache"):
        mha(x, x, x, cache=object())
    with pytest.raises(ValueError, match="needs a capacity"):
        ft.nn.KVCache()


def _train_wrapped(model, wrapper, rank):
    """Three steps of ``model`` wrapped by ``wrapper`` (DDP or FSDP2) on this rank's batches: the
    losses. The wrapped model dies on return, while the process group is still registered."""
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in model.encoder.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(3):
        x = torch.randn(4, 10, D_MODEL, generator=data)
        padding = torch.rand(4, 10, generator=data) < 0.3
        padding[:, 0] = False
        loss = model(x, padding).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _distributed_worker(rank, world_size, directory, wrapper):
    """One rank: trains an original torch.nn model and its converted twin on this rank's
    batches; writes both loss curves.

    The DDP wrappers are gone before destroy_process_group: a DDP reducer freed after it would
    be the gloo group's last owner and run its destructor holding the GIL, which waits for a
    gloo worker thread that needs the GIL (pytorch/pytorch#56297): this test hung once in CI so."""
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        original = Nested()
        converted = ft.convert(copy.deepcopy(original))
        assert type(converted.encoder.layers[0].self_attn) is ft.nn.MultiheadAttention  # really compared
        curves = [_train_wrapped(model, wrapper, rank) for model in (original, converted)]
        torch.save(curves, f"{directory}/rank{rank}.pt")
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_distributed_training_matches_unconverted(tmp_path, wrapper):
    """2 CPU processes on gloo: a converted model trains to the same losses as the original.
    The workers get 300 s: a hang fails the test instead of stalling the suite."""
    import time

    context = torch.multiprocessing.start_processes(_distributed_worker, args=(2, str(tmp_path), wrapper),
                                                    nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"the {wrapper} workers did not finish within 300 s")
    for rank in range(2):
        original, converted = torch.load(tmp_path / f"rank{rank}.pt")
        assert original[0] != original[-1], "the model did not train"
        assert converted == pytest.approx(original, rel=1e-5)
