"""The interpreter's sanitizer (interpreter_sanitizer.py) catches what a GPU would fault on or race on."""
import pytest
import torch

from conftest import SANITIZE

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fasttransformer.kernels.attention_forward import load_tile  # noqa: E402

pytestmark = pytest.mark.skipif(not SANITIZE, reason="the sanitizer runs under TRITON_INTERPRET=1, unless "
                                                     "FASTTRANSFORMER_SANITIZE=0")


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
def _tile_copy(X, Y, n, BLOCK: tl.constexpr, CHECKED: tl.constexpr):
    """X as a (BLOCK, 1) tile per program through the attention kernels' load_tile, its rows
    checked against n or not (as the kernels leave them on the tiles a mask does not cross)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = load_tile(X, rows, tl.arange(0, 1), 1, 1, n, 1, CHECKED, True, False)
    tl.store(Y + rows[:, None], x, mask=rows[:, None] < n)


def test_masked_accesses_pass_and_copy():
    x, y = torch.randn(100), torch.full((100,), float("nan"))
    _copy[(2,)](x, y, 100, BLOCK=64, LOAD_MASKED=True, STORE_MASKED=True)
    assert torch.equal(x, y)
    y.fill_(float("nan"))
    _tile_copy[(2,)](x, y, 100, BLOCK=64, CHECKED=True)
    assert torch.equal(x, y)


@pytest.mark.parametrize("load_masked, store_masked, kind", [(False, True, "load"), (True, False, "store")])
def test_unmasked_access_past_the_end_fails(load_masked, store_masked, kind):
    # The tail program's lanes 36..63 fall past both 100-element tensors.
    x, y = torch.randn(100), torch.zeros(100)
    with pytest.raises(Exception, match=rf"_copy at program \(1, 0, 0\): a masked-in {kind} of 28 lane"):
        _copy[(2,)](x, y, 100, BLOCK=64, LOAD_MASKED=load_masked, STORE_MASKED=store_masked)


def test_tile_load_without_its_row_check_fails():
    x, y = torch.randn(100), torch.zeros(100)
    with pytest.raises(Exception, match=r"masked-in load of 28 lane.*400 bytes from the start of X\W+s storage"):
        _tile_copy[(2,)](x, y, 100, BLOCK=64, CHECKED=False)


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


@triton.jit
def _shift(X, Y, n, BLOCK: tl.constexpr, SHIFT: tl.constexpr, READ_Y: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    if READ_Y:  # reads the element the next program stores: a race on a GPU
        x += tl.load(Y + offs + SHIFT, mask=offs + SHIFT < n, other=0.0)
        tl.store(Y + offs, x, mask=offs < n)
    else:  # each program stores its block and SHIFT elements of the next one
        tl.store(Y + offs + SHIFT, x, mask=offs + SHIFT < n)
        tl.store(Y + offs, x, mask=offs < n)


def test_disjoint_stores_and_own_reads_pass():
    x, y = torch.randn(100), torch.zeros(100)
    _shift[(2,)](x, y, 100, BLOCK=64, SHIFT=0, READ_Y=True)  # reads its own block, then stores it
    assert torch.equal(y, x)


def test_two_programs_storing_one_element_fail():
    x, y = torch.randn(100), torch.zeros(100)
    with pytest.raises(Exception, match=r"_shift: programs \(0, 0, 0\) and \(1, 0, 0\) both store Y's element at "
                                        r"byte 256 \(1 element"):
        _shift[(2,)](x, y, 100, BLOCK=64, SHIFT=1, READ_Y=False)


def test_reading_what_another_program_stores_fails():
    x, y = torch.randn(100), torch.zeros(100)
    with pytest.raises(Exception, match=r"_shift: program \(0, 0, 0\) reads Y's element at byte 256, which program "
                                        r"\(1, 0, 0\) of the same launch stores \(1 such lane"):
        _shift[(2,)](x, y, 100, BLOCK=64, SHIFT=1, READ_Y=True)
