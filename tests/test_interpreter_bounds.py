"""The interpreter's bounds checker (interpreter_bounds.py) catches what a GPU would fault on."""
import pytest
import torch

from conftest import BOUNDS_CHECK

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(not BOUNDS_CHECK, reason="the checker runs under TRITON_INTERPRET=1, unless FASTTRANSFORMER_BOUNDS_CHECK=0")


@triton.jit
def _copy(X, Y, n, BLOCK: tl.constexpr, LOAD_MASKED: tl.constexpr, STORE_MASKED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if LOAD_MASKED:
        x = tl.load(X + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(X + offs)
    if STORE_MASKED:
        tl.store(Y + offs, x, mask=offs < n)
    else:
        tl.store(Y + offs, x)


@triton.jit
def _block_copy(X, Y, n, BLOCK: tl.constexpr, CHECKED: tl.constexpr):
    start = tl.program_id(0) * BLOCK
    x_block = tl.make_block_ptr(X, shape=(n,), strides=(1,), offsets=(start,), block_shape=(BLOCK,), order=(0,))
    if CHECKED:
        x = tl.load(x_block, boundary_check=(0,), padding_option="zero")
    else:
        x = tl.load(x_block)
    offs = start + tl.arange(0, BLOCK)
    tl.store(Y + offs, x, mask=offs < n)


def test_masked_accesses_pass_and_copy():
    x, y = torch.randn(100), torch.full((100,), float("nan"))
    _copy[(2,)](x, y, 100, BLOCK=64, LOAD_MASKED=True, STORE_MASKED=True)
    assert torch.equal(x, y)
    y.fill_(float("nan"))
    _block_copy[(2,)](x, y, 100, BLOCK=64, CHECKED=True)
    assert torch.equal(x, y)


@pytest.mark.parametrize("load_masked, store_masked, kind", [(False, True, "load"), (True, False, "store")])
def test_unmasked_access_past_the_end_fails(load_masked, store_masked, kind):
    # The tail program's lanes 36..63 fall past both 100-element tensors.
    x, y = torch.randn(100), torch.zeros(100)
    with pytest.raises(Exception, match=rf"_copy at program \(1, 0, 0\): a masked-in {kind} of 28 lane"):
        _copy[(2,)](x, y, 100, BLOCK=64, LOAD_MASKED=load_masked, STORE_MASKED=store_masked)


def test_block_pointer_without_boundary_check_fails():
    x, y = torch.randn(100), torch.zeros(100)
    with pytest.raises(Exception, match=r"masked-in load of 28 lane.*400 bytes from the start of X's storage"):
        _block_copy[(2,)](x, y, 100, BLOCK=64, CHECKED=False)


def test_a_view_may_read_its_whole_storage():
    # Bounds are the allocation's, as on a GPU: a view reading past its own end but inside its
    # storage is not a fault (whether the values are right is the other tests' business).
    base = torch.randn(128)
    y = torch.zeros(128)
    _copy[(2,)](base[:100], y, 100, BLOCK=64, LOAD_MASKED=False, STORE_MASKED=False)
    assert torch.equal(y, base)


@triton.jit
def _gather_two(X, Y, Out, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(tl.where(offs < BLOCK // 2, X + offs, Y + offs)))


def test_one_access_spanning_two_tensors_fails():
    # Each lane is inside a tensor, but one access's lanes span two storages: what an access that
    # ran off its tensor into the next allocation looks like.
    x, y, out = torch.randn(8), torch.randn(8), torch.zeros(8)
    with pytest.raises(Exception, match=r"_gather_two at program \(0, 0, 0\): a masked-in load spans the storages "
                                        r"of X, Y"):
        _gather_two[(1,)](x, y, out, BLOCK=8)
