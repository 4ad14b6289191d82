"""fasttransformer.ops.token_positional_embedding against the float64 reference (CPU, and CUDA
when a GPU is present), its gradients, dropout, registration (opcheck, gradcheck, compile) and
its errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import fasttransformer
from accuracy import assert_within_torch_error, poisoned_allocations
from conftest import DEVICES, HAS_CUDA
from philox import philox4x32
from fasttransformer import _extension, reference
from fasttransformer.ops import embedding as embedding_op, token_positional_embedding

pytestmark = pytest.mark.skipif(not _extension.available(), reason="fasttransformer._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
op = torch.ops.fasttransformer.token_positional_embedding


def torch_chain(ids, weight, pos_weight, scale, start_pos):
    """What users write today, in the tables' dtype: the sinusoid table is built in float32
    (float64 for float64 tables), then cast, as the usual PositionalEncoding module does."""
    batch, seq_len = ids.shape
    positions = torch.as_tensor(start_pos, device=ids.device).reshape(-1, 1) + torch.arange(seq_len, device=ids.device)
    if pos_weight is None:
        table_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        inv_freq = torch.exp(torch.arange(0, weight.shape[1], 2, device=ids.device, dtype=table_dtype)
                             * (-math.log(10000.0) / weight.shape[1]))
        angle = positions.to(table_dtype)[..., None] * inv_freq
        encoding = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2).to(weight.dtype)
    else:
        encoding = pos_weight[positions.expand(batch, seq_len)]
    return F.embedding(ids, weight) * scale + encoding


# id, batch, seq_len, vocab, dim, learned, start_pos ("rows": one per sequence), padding_idx, ids
CASES = [
    pytest.param(2, 37, 50, 130, False, 0, None, "random", id="B2-L37-V50-d130-sin"),
    pytest.param(3, 11, 50257, 130, True, 5, 17, "random", id="B3-L11-V50257-d130-learned-pad"),
    pytest.param(2, 9, 1, 7, True, 0, None, "random", id="B2-L9-V1-d7-learned"),
    pytest.param(1, 1, 17, 1, True, 0, None, "random", id="B1-L1-V17-d1-learned"),
    pytest.param(2, 5, 97, 1000, False, 11, None, "random", id="B2-L5-V97-d1000-sin-start11"),
    pytest.param(4, 59, 32, 64, False, "rows", 3, "same", id="B4-L59-V32-d64-sin-rows-sameid-pad"),
    pytest.param(3, 25, 1000, 40, True, "rows", None, "same", id="B3-L25-V1000-d40-learned-rows-sameid"),
    pytest.param(2, 300, 64, 8, False, 2000, None, "random", id="B2-L300-V64-d8-sin-start2000"),
]


def make_inputs(batch, seq_len, vocab, dim, learned, start_pos, ids_kind, dtype, device, id_dtype=torch.int64):
    ids = torch.randint(0, vocab, (batch, seq_len), device=device, dtype=id_dtype)
    if ids_kind == "same":
        ids.fill_(vocab // 2)
    weight = torch.randn(vocab, dim, device=device, dtype=dtype)
    if start_pos == "rows":
        start_pos = torch.randint(0, 50, (batch,), device=device)
    max_start = int(torch.as_tensor(start_pos).max())
    pos_weight = torch.randn(max_start + seq_len + 3, dim, device=device, dtype=dtype) if learned else None
    return ids, weight, pos_weight, start_pos


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq_len,vocab,dim,learned,start_pos,padding_idx,ids_kind", CASES)
def test_forward_and_gradients_match_reference(batch, seq_len, vocab, dim, learned, start_pos,
                                               padding_idx, ids_kind, dtype, device):
    check_forward_and_gradients(batch, seq_len, vocab, dim, learned, start_pos, padding_idx, ids_kind, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq_len,vocab,dim,learned,start_pos,padding_idx,ids_kind", CASES)
def test_devices_without_kernels_run_torch_ops(batch, seq_len, vocab, dim, learned, start_pos, padding_idx,
                                               ids_kind, dtype, monkeypatch):
    """MPS, XPU (and CUDA in a build without CUDA kernels) have no kernel in _C: the op runs as
    torch's ops there, to the same accuracy rule. Checked here by sending CPU tensors that way."""
    monkeypatch.setattr(embedding_op, "_no_kernel_for", lambda device: "no kernel (the test's)")
    with pytest.warns(UserWarning, match="no kernel .the test's.; it runs as torch's unfused ops there"):
        check_forward_and_gradients(batch, seq_len, vocab, dim, learned, start_pos, padding_idx, ids_kind, dtype,
                                    "cpu")


def test_devices_without_kernels_check_indices_and_drop_out(monkeypatch):
    """The torch-ops path raises as the kernels do for ids and positions outside their tables, and
    its dropout (torch's masks) keeps about 1 - p of the values, scaled by 1 / (1 - p), the
    gradient flowing through the same mask, reproducibly under torch.manual_seed."""
    monkeypatch.setattr(embedding_op, "_no_kernel_for", lambda device: "no kernel (the test's)")
    ids, weight = torch.randint(0, 50, (4, 33)), torch.randn(50, 64, requires_grad=True)
    with pytest.warns(UserWarning, match="no kernel"):
        with pytest.raises(IndexError, match="input id 50 is outside .0, num_embeddings = 50."):
            token_positional_embedding(torch.cat([ids, torch.full((4, 1), 50)], 1), weight)
        with pytest.raises(IndexError, match="input id -1 is outside"):
            token_positional_embedding(torch.cat([torch.full((4, 1), -1), ids], 1), weight)
        with pytest.raises(IndexError, match=r"positions \(start_pos \+ t\) reach \[3, 40\], outside \[0, 40\)"):
            token_positional_embedding(ids[:2, :5], weight, torch.randn(40, 64), start_pos=torch.tensor([3, 36]))
        with pytest.raises(IndexError, match=r"reach \[-1, 32\], outside \[0, inf\)"):
            token_positional_embedding(ids[:2], weight, start_pos=torch.tensor([-1, 0]))
        torch.manual_seed(5)
        dropped = token_positional_embedding(ids, weight, scale=2.0, dropout_p=0.3)
        torch.manual_seed(5)
        again = token_positional_embedding(ids, weight, scale=2.0, dropout_p=0.3)
    full = reference.token_positional_embedding(ids, weight.double(), scale=2.0).float()
    kept = dropped != 0
    assert torch.equal(dropped, again)
    assert abs(kept.float().mean().item() - 0.7) < 0.02  # 8448 draws: 4.5 standard deviations
    torch.testing.assert_close(dropped[kept], full[kept] / 0.7)
    grad = torch.randn_like(dropped)
    (weight_grad,) = torch.autograd.grad(dropped, weight, grad)
    expected = torch.zeros_like(weight).index_add_(0, ids.flatten(), (grad * kept * 2.0 / 0.7).flatten(0, 1))
    torch.testing.assert_close(weight_grad, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learned,start_pos,padding_idx", [(False, 0, None), (True, "rows", 3), (False, "rows", None)],
                         ids=["sin", "learned-rows-pad", "sin-rows"])
def test_torch_func_grad_and_per_example_gradients(device, learned, start_pos, padding_idx):
    """torch.func.grad, and vmap(grad) over the examples' ids (and start positions), give the
    gradients autograd gives through the kernels; vmap over stacked tables (an ensemble) gives
    each table's embedding."""
    examples, batch, seq_len, vocab, dim = 3, 2, 13, 40, 16
    ids = torch.randint(0, vocab, (examples, batch, seq_len), device=device)
    ids[:, 0, 0] = padding_idx if padding_idx is not None else 0
    weight = torch.randn(vocab, dim, device=device)
    pos_weight = torch.randn(70, dim, device=device) if learned else None
    starts = torch.randint(0, 50, (examples, batch), device=device) if start_pos == "rows" else None
    grad_out = torch.randn(examples, batch, seq_len, dim, device=device)
    tables = (weight, pos_weight) if learned else (weight,)

    def loss(tables, ids, starts, grad_out):
        out = token_positional_embedding(ids, tables[0], tables[1] if learned else None, scale=2.0,
                                         padding_idx=padding_idx, start_pos=0 if starts is None else starts)
        return (out * grad_out).sum()

    grads = torch.func.vmap(torch.func.grad(loss), (None, 0, 0 if starts is not None else None, 0))(
        tables, ids, starts, grad_out)
    for index in range(examples):
        leaves = [table.clone().requires_grad_() for table in tables]
        loss(leaves, ids[index], None if starts is None else starts[index], grad_out[index]).backward()
        single = torch.func.grad(loss)(tables, ids[index], None if starts is None else starts[index], grad_out[index])
        for grad, one, leaf in zip(grads, single, leaves):
            torch.testing.assert_close(grad[index], leaf.grad)
            torch.testing.assert_close(one, leaf.grad)
    ensemble = torch.randn(examples, vocab, dim, device=device)
    outs = torch.func.vmap(lambda table: token_positional_embedding(ids[0], table))(ensemble)
    for index in range(examples):
        torch.testing.assert_close(outs[index], token_positional_embedding(ids[0], ensemble[index]))


def test_torch_func_vmapped_ids_outside_the_table_raise():
    """vmap cannot read the ids and positions back: F.embedding's own check raises (on the CPU;
    CUDA asserts), for an id outside the table, a negative start of the sinusoid and a position
    past a learned table, also when vmap runs over stacked tables (an ensemble), where torch's
    batching rule would read an id past one example's rows from the next example's table."""
    weight = torch.randn(40, 8)
    with pytest.raises(IndexError, match="index out of range"):
        torch.func.vmap(lambda ids: token_positional_embedding(ids, weight))(torch.full((3, 2, 5), 40))
    tables, positions = torch.randn(3, 40, 8), torch.randn(3, 10, 8)
    ids, starts = torch.randint(0, 40, (3, 2, 5)), torch.tensor([[0, 1], [2, 5], [0, 3]])
    ensemble = torch.func.vmap(lambda table, pos_table, ids, start: token_positional_embedding(
        ids, table, pos_table, start_pos=start))
    sinusoid = torch.func.vmap(lambda table, ids, start: token_positional_embedding(ids, table, start_pos=start))
    for index in range(3):  # in range: each example's own embedding
        torch.testing.assert_close(ensemble(tables, positions, ids, starts)[index],
                                   token_positional_embedding(ids[index], tables[index], positions[index],
                                                              start_pos=starts[index]))
    for bad_id in (40, -1):
        bad = ids.clone()
        bad[1, 0, 2] = bad_id  # example 1's table has no such row; example 2's row 0 (or 0's row 39) is not its
        with pytest.raises(IndexError, match="index out of range"):
            sinusoid(tables, bad, starts)
        with pytest.raises(IndexError, match="index out of range"):
            ensemble(tables, positions, bad, starts)
    late, negative = starts.clone(), starts.clone()
    late[1, 1], negative[2, 0] = 6, -1  # positions 6..10 of 10 rows; -1..3
    with pytest.raises(IndexError, match="index out of range"):
        ensemble(tables, positions, ids, late)
    with pytest.raises(IndexError, match="index out of range"):
        sinusoid(tables, ids, negative)
    with pytest.raises(IndexError, match="input id 40 is outside"):  # grad alone: read back and named
        torch.func.grad(lambda weight: token_positional_embedding(torch.full((2, 5), 40), weight).sum())(weight)


def test_which_devices_have_no_kernel(monkeypatch):
    assert embedding_op._no_kernel_for(torch.device("cpu")) is None
    assert embedding_op._no_kernel_for(torch.device("meta")) is None  # the fake implementation
    assert "not mps" in embedding_op._no_kernel_for(torch.device("mps"))
    assert "not xpu" in embedding_op._no_kernel_for(torch.device("xpu"))
    monkeypatch.setattr(_extension._C, "WITH_CUDA", 1)
    assert embedding_op._no_kernel_for(torch.device("cuda", 0)) is None
    monkeypatch.setattr(_extension._C, "WITH_CUDA", 0)
    assert "built without CUDA kernels" in embedding_op._no_kernel_for(torch.device("cuda", 0))


def check_forward_and_gradients(batch, seq_len, vocab, dim, learned, start_pos, padding_idx, ids_kind, dtype,
                                device):
    ids, weight, pos_weight, start_pos = make_inputs(batch, seq_len, vocab, dim, learned, start_pos,
                                                     ids_kind, dtype, device)
    if padding_idx is not None:
        ids[0, 0] = padding_idx  # the padding row must see tokens and still get no gradient
    scale = math.sqrt(dim)
    grad_out = torch.randn(batch, seq_len, dim, device=device, dtype=dtype)

    leaves = [weight.clone().requires_grad_()] + ([pos_weight.clone().requires_grad_()] if learned else [])
    out = token_positional_embedding(ids, leaves[0], leaves[1] if learned else None, scale=scale,
                                     padding_idx=padding_idx, start_pos=start_pos)
    out.backward(grad_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.token_positional_embedding(ids, ref_leaves[0], ref_leaves[1] if learned else None,
                                               scale=scale, start_pos=start_pos)
    ref.backward(grad_out.double())
    if padding_idx is not None:
        ref_leaves[0].grad[padding_idx] = 0

    base_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    base = torch_chain(ids, base_leaves[0], base_leaves[1] if learned else None, scale, start_pos)
    base.backward(grad_out)
    if padding_idx is not None:
        base_leaves[0].grad[padding_idx] = 0

    assert out.dtype == dtype and out.shape == (batch, seq_len, dim)
    assert_within_torch_error(out, ref, base, 2.0, "output")
    for name, leaf, ref_leaf, base_leaf in zip(["weight", "pos_weight"], leaves, ref_leaves, base_leaves):
        assert_within_torch_error(leaf.grad, ref_leaf.grad, base_leaf.grad, 3.0, f"grad of {name}")
    if padding_idx is not None:
        assert (leaves[0].grad[padding_idx] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_int32_and_int64_ids_agree(device, id_dtype):
    ids, weight, _, _ = make_inputs(3, 17, 300, 48, False, 0, "random", torch.float32, device, id_dtype)
    out = token_positional_embedding(ids, weight, scale=2.0, start_pos=4)
    ref = reference.token_positional_embedding(ids.long(), weight.double(), scale=2.0, start_pos=4)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim,learned", [(24, False), (7, True), (130, True)])
def test_every_output_element_is_written(device, dim, learned):
    # Under deterministic mode torch fills every empty() with NaN, the op's own at::empty included:
    # an output element the kernel does not write stays NaN.
    ids, weight, pos_weight, _ = make_inputs(5, 33, 77, dim, learned, 0, "random", torch.float16, device)
    with poisoned_allocations(device):
        outputs = [token_positional_embedding(ids, weight, pos_weight, scale=3.0, dropout_p=p) for p in (0.0, 0.3)]
    for out in outputs:
        assert torch.isfinite(out).all()


def test_output_matches_hand_computed_values():
    # d = 4, one token at position 1: P[1] = [sin 1, cos 1, sin(1e-2), cos(1e-2)].
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    out = token_positional_embedding(torch.zeros(1, 2, dtype=torch.long), weight, scale=0.5)
    expected = torch.tensor([0.5 + math.sin(1), 1 + math.cos(1), 1.5 + math.sin(0.01), 2 + math.cos(0.01)],
                            dtype=torch.float64)
    assert torch.allclose(out[0, 1], expected, rtol=0, atol=1e-14)
    assert torch.allclose(out[0, 0], torch.tensor([0.5, 2.0, 1.5, 3.0], dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_sinusoid_stays_accurate_at_large_positions(device):
    # Positions up to ~10^6: the kernel forms the angle in double, so float32 output stays within
    # a few float32 ulps of the float64 reference (a float32 angle would be off by ~0.06 here).
    weight = torch.zeros(1, 64, device=device)
    ids = torch.zeros(2, 40, dtype=torch.long, device=device)
    start = torch.tensor([999_000, 123_456], device=device)
    out = token_positional_embedding(ids, weight, start_pos=start)
    ref = reference.token_positional_embedding(ids, weight.double(), start_pos=start)
    assert (out.double() - ref).abs().max() < 1e-6


# --- dropout ---------------------------------------------------------------------------------

def philox4x32_10(counter, key):
    return list(philox4x32(counter, key, rounds=10))


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_matches_random123_known_answers(counter, key, expected):
    # Vectors from Random123's tests/kat_vectors (philox4x32 10).
    assert tuple(philox4x32_10(counter, key)) == expected


def expected_keep_mask(seed, shape, p):
    """The documented mask: element e (flat index) is kept iff word e % 4 of
    Philox4x32-10(counter = e // 4, key = seed) has top 24 bits >= round(p * 2^24)."""
    numel = math.prod(shape)
    threshold = round(p * 2**24)
    keep = []
    for block in range((numel + 3) // 4):
        words = philox4x32_10((block & 0xFFFFFFFF, block >> 32, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
        keep.extend((w >> 8) >= threshold for w in words)
    return torch.tensor(keep[:numel]).reshape(shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [6, 16, 130])
def test_dropout_mask_is_the_documented_philox_stream(device, dim):
    ids, weight, _, _ = make_inputs(2, 7, 40, dim, False, 0, "random", torch.float32, device)
    seed = 0x0123456789ABCDEF
    p = 0.3
    out = op(ids, weight, None, None, 0, 1.0, p, torch.tensor([seed], device=device), None, True)
    plain = op(ids, weight, None, None, 0, 1.0, 0.0, None, None, True)
    keep = expected_keep_mask(seed, out.shape, p).to(device)
    torch.testing.assert_close(out, torch.where(keep, plain / (1 - p), torch.zeros_like(plain)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_the_expected_fraction(device, p):
    ids, weight, _, _ = make_inputs(8, 128, 1000, 96, False, 0, "random", torch.float32, device)
    out = token_positional_embedding(ids, weight, dropout_p=p)
    kept = (out != 0).double().mean().item()
    n = out.numel()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept {kept:.4f}, expected {1 - p}"
    # Kept values are scaled by 1 / (1 - p).
    plain = token_positional_embedding(ids, weight)
    mask = out != 0
    torch.testing.assert_close(out[mask], plain[mask] / (1 - p))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_is_reproducible_under_manual_seed(device):
    ids, weight, _, _ = make_inputs(2, 50, 100, 32, False, 0, "random", torch.float32, device)
    torch.manual_seed(1234)
    first = token_positional_embedding(ids, weight, dropout_p=0.5)
    torch.manual_seed(1234)
    again = token_positional_embedding(ids, weight, dropout_p=0.5)
    other = token_positional_embedding(ids, weight, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learned", [False, True])
def test_dropout_backward_uses_the_forward_mask(device, learned):
    ids, weight, pos_weight, _ = make_inputs(3, 41, 20, 24, learned, 0, "random", torch.float64, device)
    p, scale = 0.4, 1.7
    leaves = [weight.requires_grad_()] + ([pos_weight.requires_grad_()] if learned else [])
    out = token_positional_embedding(ids, weight, pos_weight, scale=scale, dropout_p=p)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    with torch.no_grad():
        keep = out != 0  # pre-dropout values are continuous random numbers: never exactly 0
        plain = token_positional_embedding(ids, weight, pos_weight, scale=scale)
        assert torch.allclose(out, torch.where(keep, plain / (1 - p), 0), rtol=1e-12, atol=0)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = reference.token_positional_embedding(ids, ref_leaves[0], ref_leaves[1] if learned else None,
                                               scale=scale, dropout_mask=keep, dropout_p=p)
    ref.backward(grad_out)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_one_gives_zeros_and_zero_gradients(device):
    ids, weight, _, _ = make_inputs(2, 9, 10, 8, False, 0, "random", torch.float32, device)
    weight.requires_grad_()
    out = token_positional_embedding(ids, weight, dropout_p=1.0)
    out.sum().backward()
    assert (out == 0).all() and (weight.grad == 0).all()


# --- determinism -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_backward_is_bitwise_reproducible(device, dtype):
    # Few distinct ids: many tokens add to the same rows, in chunks that span chunk boundaries.
    ids = torch.randint(0, 5, (16, 257), device=device)
    weight = torch.randn(5, 72, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(16, 257, 72, device=device, dtype=dtype)
    runs = 20 if device == "cuda" else 3
    grads = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(runs):
            torch.manual_seed(0)  # the same dropout mask every run
            weight.grad = None
            out = token_positional_embedding(ids, weight, scale=2.0, dropout_p=0.1)
            out.backward(grad_out)
            grads.append(weight.grad.clone())
    finally:
        torch.use_deterministic_algorithms(previous)
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0])


# --- registration: opcheck, gradcheck, torch.compile ------------------------------------------------

def opcheck_cases(device):
    ids = torch.randint(0, 30, (2, 13), device=device)
    weight = torch.randn(30, 16, device=device, requires_grad=True)
    pos_weight = torch.randn(40, 16, device=device, requires_grad=True)
    seed = torch.tensor([42], device=device)
    starts = torch.tensor([3, 7], device=device)
    return [
        (ids, weight, None, None, 0, 4.0, 0.0, None, None, True),
        (ids.int(), weight, pos_weight, starts, 2, 1.0, 0.25, seed, 5, True),
        (ids, weight, None, starts, 0, 0.5, 0.5, seed, None, True),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in opcheck_cases(device):
        torch.library.opcheck(op, args)
    grad = torch.randn(2, 13, 16, device=device)
    index = torch.randint(0, 30, (2, 13), device=device)
    torch.library.opcheck(torch.ops.fasttransformer.token_positional_embedding_backward,
                          (grad, index, 30, 2.0, 0.25, torch.tensor([7], device=device), 3, True))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(dropout_p):
    # padding_idx = 1 is set but absent from the ids: its row's zero gradient is by design, not
    # the Jacobian, exactly as for torch.nn.functional.embedding.
    ids = torch.randint(2, 6, (2, 5))
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    pos_weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)

    def fn(weight, pos_weight):
        torch.manual_seed(7)  # the same dropout mask on every call
        return token_positional_embedding(ids, weight, pos_weight, scale=1.3, start_pos=2,
                                          padding_idx=1, dropout_p=dropout_p)

    assert torch.autograd.gradcheck(fn, (weight, pos_weight))



def test_compiled_calls_with_a_scale_that_changes():
    """A float argument that changed between calls is symbolic under torch.compile: the check of
    `scale` must trace (math.isfinite does not), and a NaN still raises, naming it."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids, weight, scale: token_positional_embedding(ids, weight, scale=scale),
                             fullgraph=True, backend="aot_eager")
    ids, weight = torch.randint(0, 37, (3, 11)), torch.randn(37, 16)
    for scale in (0.3, 1.7, -2.5):
        expected = reference.token_positional_embedding(ids, weight.double(), scale=scale)
        torch.testing.assert_close(compiled(ids, weight, scale), expected.float())
    with pytest.raises(Exception, match="scale must be finite, got nan"):
        compiled(ids, weight, float("nan"))



def test_compiled_decoding_steps_with_an_int_start_pos_compile_once():
    """Decoding passes start_pos as a Python int that grows each step. The op's schema takes it as a
    SymInt: with `int` there, torch.compile specialized on it and recompiled at every step, until
    its limit of 8 (fullgraph=True then fails; without, the steps fall back to eager)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids, weight = torch.randint(0, 37, (3, 1)), torch.randn(37, 16, requires_grad=True)
    pos_weight = torch.randn(40, 16, requires_grad=True)
    compiled = torch.compile(lambda ids, start: token_positional_embedding(ids, weight, pos_weight, scale=1.5,
                                                                           start_pos=start),
                             fullgraph=True, backend="aot_eager")
    for start in range(12):
        out = compiled(ids, start)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (weight, pos_weight), grad)
        expected = reference.token_positional_embedding(ids, weight.double(), pos_weight.double(), scale=1.5,
                                                        start_pos=start)
        expected_grads = torch.autograd.grad(expected, (weight, pos_weight), grad.double())
        torch.testing.assert_close(out, expected.float())
        for result, wanted in zip(grads, expected_grads):
            torch.testing.assert_close(result, wanted)
    # start 0 is specialized (as dynamo does for 0 and 1), then one graph with start symbolic
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    embedding = fasttransformer.nn.TokenPositionalEmbedding(100, 32, padding_idx=0, max_positions=64)
    ids = torch.randint(0, 100, (3, 20))

    def step(ids, start):
        return (embedding(ids, start_pos=start) * 2).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    starts = torch.tensor([0, 5, 9])
    loss = compiled(ids, starts)
    loss.backward()
    grads = [p.grad.clone() for p in embedding.parameters()]
    embedding.zero_grad()
    eager = step(ids, starts)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for grad, param in zip(grads, embedding.parameters()):
        torch.testing.assert_close(grad, param.grad)


# --- the module ----------------------------------------------------------------------------------

def test_module_parameters_defaults_and_state_dict():
    module = fasttransformer.nn.TokenPositionalEmbedding(50, 16, padding_idx=-1)
    assert module.scale == 4.0 and module.pos_weight is None and module.padding_idx == 49
    assert list(module.state_dict()) == ["weight"]
    assert (module.weight[49] == 0).all()
    learned = fasttransformer.nn.TokenPositionalEmbedding(50, 15, max_positions=8, scale=1.0, dropout=0.5)
    assert list(learned.state_dict()) == ["weight", "pos_weight"] and learned.pos_weight.shape == (8, 15)
    ids = torch.randint(1, 50, (2, 8))
    learned.eval()
    out = learned(ids)
    torch.testing.assert_close(out, learned.weight[ids] + learned.pos_weight[:8])  # no dropout in eval
    learned.train()
    assert (learned(ids) == 0).any()
    assert "max_positions=8" in repr(learned)


def test_module_errors():
    with pytest.raises(ValueError, match="even embedding_dim"):
        fasttransformer.nn.TokenPositionalEmbedding(10, 7)
    with pytest.raises(ValueError, match="padding_idx"):
        fasttransformer.nn.TokenPositionalEmbedding(10, 8, padding_idx=10)
    with pytest.raises(ValueError, match="dropout"):
        fasttransformer.nn.TokenPositionalEmbedding(10, 8, dropout=1.5)


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_id", [-1, 40, 2**40])
def test_out_of_range_id_raises_naming_input_ids(device, bad_id):
    ids = torch.randint(0, 40, (2, 10), device=device)
    ids[1, 3] = bad_id
    weight = torch.randn(40, 8, device=device)
    with pytest.raises(IndexError, match=rf"input_ids\[1, 3\] = {bad_id} is outside \[0, num_embeddings = 40\)"):
        token_positional_embedding(ids, weight)


@pytest.mark.parametrize("device", DEVICES)
def test_position_past_learned_table_raises(device):
    ids = torch.randint(0, 40, (2, 10), device=device)
    weight, pos_weight = torch.randn(40, 8, device=device), torch.randn(12, 8, device=device)
    with pytest.raises(IndexError, match="start_pos"):
        token_positional_embedding(ids, weight, pos_weight, start_pos=3)
    with pytest.raises(IndexError, match=r"token \[1, 8\] is at position 12"):
        token_positional_embedding(ids, weight, pos_weight, start_pos=torch.tensor([0, 4], device=device))
    with pytest.raises(IndexError, match="position -1"):
        token_positional_embedding(ids, weight, start_pos=torch.tensor([0, -1], device=device))


@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"input_ids": torch.zeros(2, 3)}, TypeError, "input_ids must be int32 or int64"),
    ({"input_ids": torch.zeros(6, dtype=torch.long)}, ValueError, r"input_ids must be \(batch, seq_len\)"),
    ({"input_ids": [[1, 2]]}, TypeError, "input_ids must be a torch.Tensor"),
    ({"weight": torch.randn(10, 8).int()}, TypeError, "weight must be float32"),
    ({"weight": torch.randn(10, 8, 1)}, ValueError, r"weight must be \(num_embeddings, dim\)"),
    ({"weight": torch.randn(10, 7)}, ValueError, "sinusoidal encoding needs an even"),
    ({"weight": torch.randn(10, 8, device="meta")}, ValueError, "input_ids is on cpu but weight is on meta"),
    ({"pos_weight": torch.randn(10, 6)}, ValueError, r"pos_weight must be \(max_positions, 8\)"),
    ({"pos_weight": torch.randn(10, 8, dtype=torch.float64)}, TypeError, "pos_weight is torch.float64"),
    ({"start_pos": -2}, ValueError, "start_pos must be >= 0"),
    ({"start_pos": 1.5}, TypeError, "start_pos must be an int"),
    ({"start_pos": torch.tensor([1.0, 2.0])}, TypeError, "start_pos must be an integer tensor"),
    ({"start_pos": torch.tensor([1, 2, 3])}, ValueError, r"start_pos must be an int or a \(batch,\)"),
    ({"dropout_p": 1.5}, ValueError, "dropout_p must be a number in"),
    ({"padding_idx": 10}, ValueError, r"padding_idx must be in \[-10, 10\)"),
    ({"padding_idx": 1.0}, TypeError, "padding_idx must be an int"),
    ({"scale": "2"}, TypeError, "scale must be a real number"),
    ({"scale": float("nan")}, ValueError, "scale must be finite, got nan"),
    ({"start_pos": 2**63 - 3}, ValueError, r"start_pos \+ seq_len must be below 2\*\*63"),  # int64 positions
    ({"start_pos": 2**64}, ValueError, r"start_pos \+ seq_len must be below 2\*\*63"),  # torch: "not an 'int'"
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, pattern):
    args = {"input_ids": torch.randint(0, 10, (2, 3)), "weight": torch.randn(10, 8)}
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        token_positional_embedding(args.pop("input_ids"), args.pop("weight"), args.pop("pos_weight", None), **args)


def test_native_op_checks_its_arguments_too():
    # Callers of torch.ops.fasttransformer.* skip the Python checks; the C++ boundary has its own.
    with pytest.raises(RuntimeError, match="input_ids must be int32 or int64"):
        op(torch.zeros(2, 3), torch.randn(10, 8), None, None, 0, 1.0, 0.0, None, None, True)
    with pytest.raises(RuntimeError, match="dropout needs seed"):
        op(torch.zeros(2, 3, dtype=torch.long), torch.randn(10, 8), None, None, 0, 1.0, 0.5, None, None, True)


def test_empty_inputs():
    weight = torch.randn(10, 8, requires_grad=True)
    out = token_positional_embedding(torch.zeros(0, 5, dtype=torch.long), weight)
    assert out.shape == (0, 5, 8)
    out.sum().backward()
    assert (weight.grad == 0).all()
    assert token_positional_embedding(torch.zeros(3, 0, dtype=torch.long), weight).shape == (3, 0, 8)


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_IMPORT_ERROR", ImportError("no module named _C"))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        token_positional_embedding(torch.zeros(1, 2, dtype=torch.long), torch.randn(3, 4))


# --- CUDA only -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_dropout_mask_equals_cpu_mask():
    ids, weight, _, _ = make_inputs(3, 31, 50, 40, False, 0, "random", torch.float32, "cpu")
    seed = torch.tensor([987654321])
    cpu = op(ids, weight, None, None, 0, 1.0, 0.5, seed, None, True)
    cuda = op(ids.cuda(), weight.cuda(), None, None, 0, 1.0, 0.5, seed.cuda(), None, True)
    assert torch.equal(cpu != 0, cuda.cpu() != 0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay():
    ids = torch.randint(0, 100, (4, 64), device="cuda")
    weight = torch.randn(100, 128, device="cuda", dtype=torch.bfloat16)
    expected = token_positional_embedding(ids, weight, scale=2.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        token_positional_embedding(ids, weight, scale=2.0)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = token_positional_embedding(ids, weight, scale=2.0)
    ids.copy_(torch.randint(0, 100, (4, 64), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, token_positional_embedding(ids, weight, scale=2.0))
    assert not torch.equal(captured, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_large_index_arithmetic():
    # More than 2^31 output elements: offsets must be computed in 64 bits.
    tokens, dim = 2**31 // 1024 + 64, 1024
    ids = torch.randint(0, 8, (1, tokens), device="cuda")
    weight = torch.randn(8, dim, device="cuda", dtype=torch.bfloat16)
    out = token_positional_embedding(ids, weight)
    tail = ids[:, -3:]
    expected = reference.token_positional_embedding(tail.cpu(), weight.double().cpu(), start_pos=tokens - 3)
    assert (out[:, -3:].double().cpu() - expected).abs().max() < 0.05


# --- property test: random shapes and options ------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), seq_len=st.integers(1, 40), vocab=st.integers(1, 300),
       half_dim=st.integers(1, 70), learned=st.booleans(), start=st.integers(0, 5000),
       per_row=st.booleans(), pad=st.booleans(), int32_ids=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31))
def test_random_configurations_match_reference(batch, seq_len, vocab, half_dim, learned, start, per_row,
                                               pad, int32_ids, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    dim = 2 * half_dim - (1 if learned and half_dim % 3 == 0 else 0)  # odd dims with learned positions
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    weight = torch.randn(vocab, dim, dtype=dtype, generator=generator, requires_grad=True)
    start_pos = torch.randint(0, start + 1, (batch,), generator=generator) if per_row else start
    max_start = int(torch.as_tensor(start_pos).max())
    pos_weight = (torch.randn(max_start + seq_len, dim, dtype=dtype, generator=generator, requires_grad=True)
                  if learned else None)
    padding_idx = int(ids[0, 0]) if pad else None
    scale = 0.5 + seed % 7
    out = token_positional_embedding(ids.int() if int32_ids else ids, weight, pos_weight, scale=scale,
                                     padding_idx=padding_idx, start_pos=start_pos)
    grad_out = torch.randn(out.shape, dtype=dtype, generator=generator)
    out.backward(grad_out)
    leaves = [weight] + ([pos_weight] if learned else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.token_positional_embedding(ids, ref_leaves[0], ref_leaves[1] if learned else None,
                                               scale=scale, start_pos=start_pos)
    ref.backward(grad_out.double())
    if pad:
        ref_leaves[0].grad[padding_idx] = 0
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5 * scale
    assert (out.double() - ref).abs().max() <= tolerance * (1 + ref.abs().max())
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert (leaf.grad.double() - ref_leaf.grad).abs().max() <= tolerance * (1 + ref_leaf.grad.abs().max()) * seq_len
