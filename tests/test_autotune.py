"""FASTTRANSFORMER_AUTOTUNE=1 (fasttransformer/ops/autotune.py): the search, its cache file, and
that a tuned call gives the bits of the kernels' launch with the chosen config.

On the CPU the search runs under Triton's interpreter (autotune.DEVICE_TYPES is given "cpu"),
with a stand-in timer that ranks the configs as a test says: interpreter times mean nothing. The
CUDA test times for real, on a few candidates."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from accuracy import assert_within_torch_error
from conftest import HAS_CUDA
from fasttransformer import reference
from fasttransformer.kernels import attention_backward as backward_module
from fasttransformer.kernels import attention_forward as forward_module
from fasttransformer.kernels import attention_jvp as jvp_module
from fasttransformer.kernels.configs import Config
from fasttransformer.ops import autotune, scaled_dot_product_attention

LOGGER = "fasttransformer"


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Autotune on, for CPU tensors too, with its file in tmp_path; a record of the configs each
    launch ran with (None: the table's), and a timer whose times the test sets by config."""
    monkeypatch.setattr(autotune, "ENABLED", True)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    monkeypatch.setattr(autotune, "DEVICE_TYPES", ("cuda", "cpu"))
    autotune.clear_memory()
    state = {"launches": [], "costs": {}, "measured": []}

    def recording(module, name, config_of):
        launcher = getattr(module, name)

        def launch(*args, **kwargs):
            state["launches"].append((name, config_of(kwargs)))
            return launcher(*args, **kwargs)
        monkeypatch.setattr(module, name, launch)

    def forward_config(kwargs):
        tiles = [kwargs.get(k) for k in ("block_m", "block_n", "num_warps", "num_stages")]
        return None if tiles == [None] * 4 else Config(*tiles)

    recording(forward_module, "attention_forward", forward_config)
    recording(backward_module, "attention_backward", lambda kwargs: (kwargs["dkdv_config"], kwargs["dq_config"]))
    recording(jvp_module, "attention_jvp", lambda kwargs: kwargs["config"])

    def measure(run, device):  # runs it once (the sanitizer checks every candidate's launch)
        run()
        config = state["launches"][-1][1]
        state["measured"].append(config)
        cost = state["costs"].get(config, 10.0)
        if isinstance(cost, BaseException):
            raise cost
        return cost

    monkeypatch.setattr(autotune, "_measure", measure)
    state["file"] = tmp_path / "autotune.json"
    yield state
    autotune.clear_memory()


def inputs(dtype=torch.float16, requires_grad=False, lq=37, lk=45, head_dim=16):
    q = torch.randn(1, 2, lq, head_dim, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(1, 2, lk, head_dim, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def test_off_by_default_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setattr(autotune, "ENABLED", False)
    monkeypatch.setattr(autotune, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(autotune, "search", lambda *args, **kwargs: pytest.fail("tuned with autotune off"))
    q, k, v = inputs(requires_grad=True)
    out = scaled_dot_product_attention(q, k, v, backend="triton")
    out.sum().backward()
    torch.func.jvp(lambda q: scaled_dot_product_attention(q, k.detach(), v.detach(), backend="triton"),
                   (q.detach(),), (torch.randn_like(q),))
    monkeypatch.setattr(autotune, "ENABLED", None)  # what a bad FASTTRANSFORMER_AUTOTUNE leaves
    monkeypatch.setattr(autotune, "_BAD_VALUE", "fast")
    with pytest.raises(ValueError, match="FASTTRANSFORMER_AUTOTUNE must be 1 .* got 'fast'"):
        scaled_dot_product_attention(q, k, v, backend="triton")
    with pytest.raises(TypeError, match="on must be a bool"):
        autotune.enable("yes")
    autotune.enable()
    assert autotune.enabled() is True
    autotune.enable(False)
    assert autotune.enabled() is False


SCRIPT = """
import torch
from fasttransformer.ops import autotune, scaled_dot_product_attention
print(autotune.ENABLED)
q = torch.randn(1, 1, 4, 16)
try:
    scaled_dot_product_attention(q, q, q, backend="triton")
except ValueError as error:
    print(error)
"""


@pytest.mark.parametrize("value, expected", [(None, False), ("1", True), (" ON ", True), ("yes", True), ("0", False),
                                             ("off", False), ("", False), ("fast", None)])
def test_the_environment_variable_values(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(autotune.ENV, raising=False)
    else:
        monkeypatch.setenv(autotune.ENV, value)
    assert autotune._from_environment() is expected


def test_the_environment_variable_is_read_at_import():
    """In a fresh process: on, and a bad value named by the first attention call."""
    env = {name: v for name, v in os.environ.items() if name != autotune.ENV}
    env["TRITON_INTERPRET"] = "1"
    for value, expected in (("1", "True"), ("fast", "None\nFASTTRANSFORMER_AUTOTUNE must be 1 (tune) or 0 (the "
                                                    "config table), got 'fast'")):
        result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                                env={**env, autotune.ENV: value}, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_cpu_tensors_are_not_tuned_outside_the_tests(monkeypatch):
    monkeypatch.setattr(autotune, "ENABLED", True)
    monkeypatch.setattr(autotune, "search", lambda *args, **kwargs: pytest.fail("tuned a CPU call"))
    q, k, v = inputs()
    scaled_dot_product_attention(q, k, v, backend="triton")


def test_forward_takes_the_fastest_config_and_its_bits(tuning, caplog):
    chosen = Config(128, 32, 8, 3)  # the grid's best at 2 stages, then better at 3
    tuning["costs"] = {None: 10.0, Config(128, 32, 8, 2): 6.0, chosen: 4.0, Config(64, 64, 4, 2): 7.0}
    q, k, v = inputs()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    grid = autotune.candidates("forward", q.dtype, q.shape[2])
    assert tuning["measured"] == [None, *grid, chosen._replace(num_stages=1), chosen]
    assert tuning["launches"][-1] == ("attention_forward", chosen)  # the result: one more launch, with it
    assert "autotune forward" in caplog.text and "128, 32, 8, 3" in caplog.text
    expected, _ = forward_module.attention_forward(q, k, v, causal_offset=0, block_m=128, block_n=32, num_warps=8,
                                                   num_stages=3)
    assert torch.equal(out, expected)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    plain = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_within_torch_error(out, ref, plain)

    # Later calls of the case (another length in the same power of two) look it up: no timing.
    tuning["measured"].clear()
    q2, k2, v2 = inputs(lq=50, lk=60)
    scaled_dot_product_attention(q2, k2, v2, is_causal=True, backend="triton")
    assert tuning["measured"] == [] and tuning["launches"][-1] == ("attention_forward", chosen)

    # A new process reads the file.
    entries = json.loads(tuning["file"].read_text())["entries"]
    (name, entry), = entries.items()
    assert name.startswith("forward/cpu/float16/D16/Dv16/group1/Lq64/Lk64/BH2/mask-none/no-padding/causal/")
    assert entry["choice"] == list(chosen) and entry["stamp"] == autotune.stamp()
    assert entry["times_ms"]["table"] == 10.0 and entry["times_ms"]["128x32x8x3"] == 4.0
    autotune.clear_memory()
    again = scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    assert tuning["measured"] == [] and torch.equal(again, out)


def test_the_table_stays_unless_a_candidate_is_clearly_faster(tuning):
    tuning["costs"] = {None: 10.0, Config(64, 32, 4, 2): 9.8}  # 2% faster: noise
    q, k, v = inputs()
    scaled_dot_product_attention(q, k, v, backend="triton")
    assert tuning["launches"][-1] == ("attention_forward", None)
    (entry,) = json.loads(tuning["file"].read_text())["entries"].values()
    assert entry["choice"] is None and entry["times_ms"]["64x32x4x2"] == 9.8


def test_backward_tunes_dkdv_then_dq_inside_the_whole_backward(tuning):
    dkdv, dq = Config(32, 128, 4, 2), Config(64, 64, 8, 2)
    tuning["costs"] = {(None, None): 10.0, (dkdv, None): 8.0, (dkdv, dq): 5.0}
    q, k, v = inputs(requires_grad=True)
    mask = torch.randn(37, 45, dtype=torch.float16, requires_grad=True)  # with its gradient
    padding = torch.rand(1, 45) < 0.3
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, key_padding_mask=padding, backend="triton")
    grad = torch.randn_like(out)
    tuning["measured"].clear()
    grads = torch.autograd.grad(out, (q, k, v, mask), grad)
    searched = tuning["measured"]
    dkdv_grid, dq_grid = (autotune.candidates(kernel, q.dtype, 37) for kernel in ("dkdv", "dq"))
    assert searched[:len(dkdv_grid) + 1] == [(None, None)] + [(c, None) for c in dkdv_grid]
    assert (dkdv, None) in searched and (dkdv._replace(num_stages=3), None) in searched
    assert [c for c in searched if c[0] == dkdv and c[1] is not None][-1] == (dkdv, dq._replace(num_stages=3))
    assert tuning["launches"][-1] == ("attention_backward", (dkdv, dq))
    entry = json.loads(tuning["file"].read_text())["entries"]
    (name,) = [name for name in entry if name.startswith("backward/")]
    assert name.endswith("/mask-float/padding/not-causal/no-window/no-dropout/bias_grad")
    assert entry[name]["choice"] == [list(dkdv), list(dq)]

    fwd_out, lse = forward_module.attention_forward(q.detach(), k.detach(), v.detach(), attn_mask=mask.detach(),
                                                    key_padding_mask=padding)
    expected = backward_module.attention_backward(grad, q.detach(), k.detach(), v.detach(), fwd_out, lse,
                                                  attn_mask=mask.detach(), key_padding_mask=padding, bias_grad=True,
                                                  dkdv_config=dkdv, dq_config=dq)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)
    wide = [t.double().detach().requires_grad_() for t in (q, k, v, mask)]
    ref_grads = torch.autograd.grad(reference.scaled_dot_product_attention(
        *wide[:3], attn_mask=wide[3].masked_fill(padding[:, None, None, :], float("-inf"))), wide, grad.double())
    plain = [t.detach().requires_grad_() for t in (q, k, v, mask)]
    plain_grads = torch.autograd.grad(reference.scaled_dot_product_attention(
        *plain[:3], attn_mask=plain[3].masked_fill(padding[:, None, None, :], float("-inf"))), plain, grad)
    magnitude = max(g.abs().max().item() for g in ref_grads)
    for got, want, torch_result, what in zip(grads, ref_grads, plain_grads, "qkvm"):
        assert_within_torch_error(got, want, torch_result, factor=3.0, what=f"d{what}", magnitude=magnitude)


def test_forward_mode_is_tuned_too(tuning):
    chosen = Config(64, 32, 4, 1)
    tuning["costs"] = {None: 10.0, Config(64, 32, 4, 2): 7.0, chosen: 6.0}
    q, k, v = inputs()
    tangents = inputs()
    out, tangent = torch.func.jvp(lambda q, k, v: scaled_dot_product_attention(q, k, v, backend="triton"),
                                  (q, k, v), tangents)
    assert tuning["launches"][-1] == ("attention_jvp", chosen)
    assert any(name.startswith("jvp/") for name in json.loads(tuning["file"].read_text())["entries"])
    forward_config = [config for name, config in tuning["launches"] if name == "attention_forward"][-1]
    tiles = {} if forward_config is None else dict(zip(("block_m", "block_n", "num_warps", "num_stages"),
                                                      forward_config))
    primal, lse = forward_module.attention_forward(q, k, v, **tiles)
    assert torch.equal(primal, out)
    expected = jvp_module.attention_jvp(q, k, v, out, lse, *tangents, config=chosen)
    assert torch.equal(tangent, expected)


def test_decoding_steps_have_their_own_grid_and_case():
    grid = autotune.candidates("forward", torch.float16, 1)
    assert {c.block_m for c in grid} == set(autotune.DECODE_ROWS) and max(c.block_n for c in grid) == 256
    assert {c.block_m for c in autotune.candidates("forward", torch.float16, 17)} == set(autotune.LONG["2-byte"])
    assert {c.block_n for c in autotune.candidates("dkdv", torch.bfloat16, 128)} == set(autotune.LONG["2-byte"])
    assert max(max(c.block_m, c.block_n) for c in autotune.candidates("dq", torch.float32, 128)) == 64
    for kernel in ("forward", "dkdv", "dq", "jvp"):
        for config in autotune.candidates(kernel, torch.float16, 64):
            assert autotune._valid_config(list(config)), config

    q, k, v = inputs(lq=1, lk=300)
    q4 = torch.randn(1, 8, 1, 16, dtype=torch.float16)
    keys = {autotune.case_key("forward", q, k, v), autotune.case_key("forward", q4, k, v),
            autotune.case_key("forward", *inputs(lq=1, lk=400)), autotune.case_key("forward", *inputs(lq=1, lk=600)),
            autotune.case_key("forward", q, k, v, key_padding_mask=torch.zeros(1, 300, dtype=torch.bool)),
            autotune.case_key("forward", q.float(), k.float(), v.float()),
            autotune.case_key("forward", q, k, v, causal_offset=299)}
    assert len(keys) == 6  # Lk 300 and 400 share their power of two; the others differ
    assert autotune.case_key("forward", q, k, v) == autotune.case_key("forward", *inputs(lq=1, lk=300))


def test_a_candidate_the_gpu_cannot_run_is_skipped_and_the_tables_errors_are_the_calls(tuning):
    from triton.runtime.errors import OutOfResources
    too_big, chosen = Config(128, 128, 4, 2), Config(128, 64, 4, 2)
    tuning["costs"] = {None: 10.0, too_big: OutOfResources(232448, 227328, "shared memory"), chosen: 5.0}
    q, k, v = inputs()
    out = scaled_dot_product_attention(q, k, v, backend="triton")
    assert tuning["launches"][-1] == ("attention_forward", chosen) and torch.isfinite(out).all()
    (entry,) = json.loads(tuning["file"].read_text())["entries"].values()
    assert "128x128x4x2" not in entry["times_ms"] and "128x64x4x2" in entry["times_ms"]

    autotune.clear_memory()
    tuning["file"].unlink()
    tuning["costs"] = {None: OutOfResources(232448, 227328, "shared memory")}
    with pytest.raises(OutOfResources):
        scaled_dot_product_attention(q, k, v, backend="triton")
    assert not tuning["file"].exists()


def test_out_of_memory_while_tuning_keeps_the_table_unsaved(tuning, caplog):
    tuning["costs"] = {None: 10.0, Config(64, 32, 8, 2): torch.OutOfMemoryError("CUDA out of memory")}
    q, k, v = inputs()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scaled_dot_product_attention(q, k, v, backend="triton")
        count = len(tuning["measured"])
        scaled_dot_product_attention(q, k, v, backend="triton")
    assert tuning["launches"][-1] == ("attention_forward", None) and len(tuning["measured"]) == count
    assert "out of memory while timing forward/" in caplog.text and not tuning["file"].exists()


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"format": 99, "entries": {}})])
def test_an_unreadable_file_is_tuned_again_and_rewritten(tuning, caplog, content):
    tuning["file"].write_text(content)
    tuning["costs"] = {None: 10.0, Config(64, 64, 8, 2): 5.0}
    q, k, v = inputs()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scaled_dot_product_attention(q, k, v, backend="triton")
    assert "autotune: " in caplog.text and str(tuning["file"]) in caplog.text
    assert tuning["launches"][-1] == ("attention_forward", Config(64, 64, 8, 2))
    data = json.loads(tuning["file"].read_text())
    assert data["format"] == autotune.FORMAT and len(data["entries"]) == 1


@pytest.mark.parametrize("choice", [[3, 64, 4, 2], [64, 64, 4], "fast", [64, 64, 4, 0], [[64, 64, 4, 2]]])
def test_a_bad_entry_is_tuned_again(tuning, caplog, choice):
    q, k, v = inputs()
    name = "/".join(autotune.case_key("forward", q, k, v))
    other = {"stamp": "an older build", "choice": [16, 16, 1, 1]}  # kept, not used
    tuning["file"].write_text(json.dumps({"format": autotune.FORMAT, "entries": {
        name: {"stamp": autotune.stamp(), "choice": choice}, "forward/older": other}}))
    tuning["costs"] = {None: 10.0, Config(64, 64, 8, 2): 5.0}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scaled_dot_product_attention(q, k, v, backend="triton")
    assert "not a config; tuning again" in caplog.text
    assert tuning["launches"][-1] == ("attention_forward", Config(64, 64, 8, 2))
    entries = json.loads(tuning["file"].read_text())["entries"]
    assert entries[name]["choice"] == [64, 64, 8, 2] and entries["forward/older"] == other


def test_another_stamp_is_tuned_again(tuning):
    q, k, v = inputs()
    name = "/".join(autotune.case_key("forward", q, k, v))
    tuning["file"].write_text(json.dumps({"format": autotune.FORMAT, "entries": {
        name: {"stamp": "kernels of another version", "choice": [16, 16, 1, 1]}}}))
    tuning["costs"] = {None: 10.0, Config(64, 64, 8, 2): 5.0}
    scaled_dot_product_attention(q, k, v, backend="triton")
    assert tuning["measured"] and tuning["launches"][-1] == ("attention_forward", Config(64, 64, 8, 2))


def test_an_unwritable_file_keeps_the_choices_in_memory(tuning, monkeypatch, tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "a-file" / "autotune.json"))
    tuning["costs"] = {None: 10.0, Config(64, 64, 8, 2): 5.0}
    q, k, v = inputs()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scaled_dot_product_attention(q, k, v, backend="triton")
        count = len(tuning["measured"])
        scaled_dot_product_attention(q, k, v, backend="triton")
    assert "cannot write" in caplog.text and len(tuning["measured"]) == count
    assert tuning["launches"][-1] == ("attention_forward", Config(64, 64, 8, 2))

    monkeypatch.setenv(autotune.CACHE_ENV, "")  # memory only: no file anywhere
    assert autotune.cache_path() is None
    autotune.clear_memory()
    scaled_dot_product_attention(q, k, v, backend="triton")
    assert len(tuning["measured"]) > count and not list(tmp_path.glob("*.json"))


WRITER = """
import sys, time
from pathlib import Path
from fasttransformer.ops import autotune
path, name = Path(sys.argv[1]), sys.argv[2]
(path.parent / ("ready-" + name)).touch()
while not (path.parent / "go").exists():  # every writer starts at once
    time.sleep(0.001)
for i in range(100):
    autotune._save(path, f"forward/{name}/{i}", {"stamp": "s", "choice": None})
"""


def test_processes_writing_at_once_keep_every_entry(tmp_path):
    """Four processes adding 100 entries each to one file at the same time (ranks of a job
    sharing it): the lock around the read, merge and write keeps all 400 (without it, a write
    made between another's read and its write is lost)."""
    path = tmp_path / "autotune.json"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"rank{rank}"]) for rank in range(4)]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [writer.wait(timeout=300) for writer in writers] == [0] * 4
    entries = json.loads(path.read_text())["entries"]
    assert set(entries) == {f"forward/rank{rank}/{i}" for rank in range(4) for i in range(100)}


def test_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "fasttransformer" / "autotune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autotune.cache_path() == tmp_path / ".cache" / "fasttransformer" / "autotune.json"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_autotune_times_candidates_and_graphs_take_the_table(monkeypatch, tmp_path):
    """On the GPU, for real (a few candidates, for time): the choice is kept in the file and used;
    a case first met while a CUDA graph is captured is not tuned."""
    monkeypatch.setattr(autotune, "ENABLED", True)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    monkeypatch.setattr(autotune, "LONG", {"2-byte": (64,), "fp32": (32,)})
    monkeypatch.setattr(autotune, "SHORT", {"2-byte": (32, 64), "fp32": (16,)})
    monkeypatch.setattr(autotune, "WARPS", (4,))
    monkeypatch.setattr(autotune, "STAGES", (3,))
    autotune.clear_memory()
    try:
        q, k, v = (torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        out = scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        entries = json.loads((tmp_path / "autotune.json").read_text())["entries"]
        assert {name.split("/")[0] for name in entries} == {"forward", "backward"}
        assert all(len(entry["times_ms"]) >= 3 for entry in entries.values())
        ref = reference.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=True)
        plain = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert_within_torch_error(out, ref, plain)
        again = scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        assert torch.equal(again, out) and torch.equal(torch.autograd.grad(again, (q, k, v), grad)[0], grads[0])

        x = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.float16)  # a case not yet tuned
        autotune.enable(False)
        scaled_dot_product_attention(x, x, x, backend="triton")  # the table's compile, outside the capture
        autotune.enable(True)
        monkeypatch.setattr(autotune, "search", lambda *args, **kwargs: pytest.fail("tuned while capturing"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = scaled_dot_product_attention(x, x, x, backend="triton")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, forward_module.attention_forward(x, x, x)[0])
    finally:
        autotune.clear_memory()
