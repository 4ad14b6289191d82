"""`fasttransformer bench`: FLOP/byte accounting, the attention cases' implementations agreeing
with each other, rendering from records, the README section, and the CLI end to end on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttransformer.__main__ import main
from fasttransformer.bench import attention, embedding, model

ROOT = Path(__file__).resolve().parents[1]
CPU_RESULTS = ROOT / "benchmarks" / "results" / "2026-11-23-cpu"


def test_flop_and_byte_accounting_by_hand():
    # B=2, H=3, L=4, D=8 without a mask: 2*3*16 = 96 pairs, 4*8 = 32 FLOPs each
    assert attention.flops(96, 8, "fwd") == 96 * 32
    assert attention.flops(96, 8, "bwd") == 2.5 * 96 * 32
    assert attention.flops(96, 8, "fwd+bwd") == 3.5 * 96 * 32
    # Q, K, V read and O written: 4 tensors of 2*3*4*8 bf16 values
    assert attention.bytes_moved(2, 3, 4, 8, 2, "fwd") == 4 * 2 * 3 * 4 * 8 * 2
    assert attention.bytes_moved(2, 3, 4, 8, 2, "bwd") == 8 * 2 * 3 * 4 * 8 * 2
    # a decoding step: Q and O of one query, K and V of 4 keys, per (sequence, head)
    assert attention.bytes_moved(2, 3, 4, 8, 2, "fwd", seqlen_q=1) == 2 * 3 * (2 * 1 + 2 * 4) * 8 * 2
    # a value head dim of 24 (D = 8): QK^T 2 * 8 and PV 2 * 24 FLOPs a pair; Q, K of 8 values a
    # row, V, O of 24; the backward reads Q, K, V, O, dO and writes dQ, dK, dV
    assert attention.flops(96, 8, "fwd", head_dim_v=24) == 96 * (16 + 48)
    assert attention.bytes_moved(2, 3, 4, 8, 2, "fwd", head_dim_v=24) == 2 * 3 * 4 * (8 + 8 + 24 + 24) * 2
    assert attention.bytes_moved(2, 3, 4, 8, 2, "bwd", head_dim_v=24) == 2 * 3 * 4 * 2 * (8 + 8 + 24 + 24) * 2


@pytest.mark.parametrize("mask,expected", [("none", 1.0), ("causal", 0.5), ("window", None), ("padding", None)])
def test_visible_pairs(mask, expected):
    case = attention.Case(mask, 64, 16, "cpu", torch.float32, tokens=128, hidden=32)
    assert (case.batch, case.heads) == (2, 2)
    fraction = case.visible_pairs / (case.batch * case.heads * 64 * 64)
    if mask == "window":  # each query sees min(i + 1, 256) keys: all of the causal triangle at L=64
        expected = (64 * 65 / 2) / 64**2
    if mask == "padding":  # each sequence keeps its first `length` keys
        expected = (~case.ours_kwargs["key_padding_mask"]).float().mean().item()
    assert fraction == pytest.approx(expected)


@pytest.mark.parametrize("mask", attention.MASKS)
def test_attention_case_implementations_agree(mask):
    """Every implementation that runs on the CPU computes the same attention for the case
    (fasttransformer on the Triton interpreter, torch's backends that accept it, FlexAttention
    eager, naive)."""
    from torch.nn.attention.flex_attention import flex_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels' device (interpreter on CPU)
    case = attention.Case(mask, 96, 16, device, torch.float32, tokens=192, hidden=32)
    for tensor in (case.q, case.k, case.v):
        tensor.requires_grad_(False)  # FlexAttention refuses inputs that need grad on the CPU
    expected = case.naive()
    implementations = case.implementations()
    results = {name: implementations[name]() for name in ("fasttransformer", "torch-math")}
    flex_case = attention._FLEX.pop("fn", None)
    attention._FLEX["fn"] = flex_attention  # eager here: compiling on the CPU would dominate the suite
    try:
        results["flex"] = case.flex()()
    finally:
        attention._FLEX.pop("fn")
        if flex_case is not None:
            attention._FLEX["fn"] = flex_case
    if mask in attention.DECODE_MASKS:  # the split keys' baseline: the Triton forward with num_splits=1
        results["unsplit"] = implementations["unsplit"]()
    else:
        with pytest.raises(NotImplementedError, match="for decode"):
            implementations["unsplit"]()
    if mask in attention.GQA_MASKS:  # the packing's baseline: one program per query head
        assert case.kv_heads == 1 and case.k.shape[1] == 1  # verify-gqa7: 7 query heads per key head, not 2
        assert case.heads == case.q.shape[1] == (attention.QWEN2_GROUP if mask == "verify-gqa7" else 2)
        assert case.q.shape[2] == (attention.SPECULATIVE_QUERIES if mask in attention.VERIFY_MASKS else 1)
        results["unpacked"] = implementations["unpacked"]()
    else:
        with pytest.raises(NotImplementedError, match="for decode-gqa and verify-gqa"):
            implementations["unpacked"]()
    for name in ("torch-flash", "torch-efficient", "torch-cudnn"):  # where a backend refuses: reported n/a
        try:
            results[name] = implementations[name]()
        except RuntimeError as error:
            assert attention._reason(error).startswith("RuntimeError: ")
    for name, result in results.items():
        torch.testing.assert_close(result, expected, atol=2e-5, rtol=2e-5, msg=name)


def synthetic_attention_record():
    """A record shaped like a GPU sweep's (invented numbers: it tests the rendering only)."""
    row = {"mask": "causal", "head_dim": 128, "seqlen": 4096, "batch": 4, "heads": 16, "mode": "fwd",
           "visible_fraction": 0.5, "flops": 1e12, "times_ms": {"fasttransformer": 2.0, "torch-flash": 3.0},
           "peak_mib": {}, "not_run": {"torch-cudnn": "RuntimeError: no kernel"}}
    row["tflops"] = {name: row["flops"] / ms / 1e9 for name, ms in row["times_ms"].items()}
    row["fraction_of_matmul"] = {name: value / 800 for name, value in row["tflops"].items()}
    row["speedup"] = {name: ms / 2.0 for name, ms in row["times_ms"].items()}
    decode = {"mask": "decode", "head_dim": 128, "seqlen": 8192, "seqlen_q": 1, "batch": 2, "heads": 16, "mode": "fwd",
              "visible_fraction": 1.0, "flops": 1.3e8, "bytes": 1.5e8, "times_ms": {"fasttransformer": 0.06},
              "peak_mib": {}, "not_run": {}}
    decode["tflops"] = {"fasttransformer": 1.3e8 / 0.06 / 1e9}
    decode["fraction_of_matmul"] = {"fasttransformer": decode["tflops"]["fasttransformer"] / 800}
    decode["gbps"] = {"fasttransformer": 1.5e8 / 0.06 / 1e6}
    decode["fraction_of_copy"] = {"fasttransformer": 2500 / 3000}
    decode["speedup"] = {"fasttransformer": 1.0}
    environment = {"device": "Synthetic GPU", "date": "2026-01-01", "torch": "x", "triton": "y", "commit": "z",
                   "command": "test", "cuda": "13.0", "driver": "1"}
    return {"benchmark": "attention", "environment": environment, "tokens": 16384, "hidden": 2048,
            "dtype": "bfloat16", "ceilings": {"matmul_tflops": 800.0, "copy_gbps": 3000.0}, "results": [row, decode]}


def test_attention_markdown_and_plot(tmp_path):
    record = synthetic_attention_record()
    text = attention.markdown(record)
    assert "| causal | 128 | 4096 | fwd | 50% | 500 (62%) | 1.50x | n/a | n/a |" in text
    assert "| decode | 128 | 8192 | fwd | 100% | 2500 GB/s (83% of copy) | n/a |" in text
    assert "- torch-cudnn: RuntimeError: no kernel" in text
    assert attention.plot(record, tmp_path / "attention.png")
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    skipped = {"benchmark": "attention", "skipped": attention.SKIPPED_WITHOUT_GPU, "results": []}
    assert "Skipped: no CUDA GPU" in attention.markdown(skipped)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
def test_attention_sweep_rows_small():
    """The sweep's bookkeeping, on a small case: a row per mode, the derived backward row, FLOPs,
    speedups, and a baseline that cannot run reported with its reason."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = attention.sweep(device, masks=("causal",), head_dims=(16,), seqlens=(64,), dtype=torch.float32,
                             tokens=128, hidden=32, implementations=("fasttransformer", "torch-math", "torch-flash"))
    rows = {row["mode"]: row for row in record["results"]}
    assert sorted(rows) == ["bwd", "fwd", "fwd+bwd", "jvp"]
    for mode, row in rows.items():
        assert row["flops"] == attention.flops(2 * 2 * 64 * 64 // 2, 16, mode)
        assert row["speedup"]["fasttransformer"] == 1.0
        assert {"fasttransformer", "torch-math"} <= set(row["times_ms"])
        assert "torch-flash" in row["times_ms"] or row["not_run"]["torch-flash"]
    assert rows["bwd"]["times_ms"]["torch-math"] == pytest.approx(
        rows["fwd+bwd"]["times_ms"]["torch-math"] - rows["fwd"]["times_ms"]["torch-math"])
    assert "| causal | 16 | 64 | bwd |" in attention.markdown(record)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
def test_attention_sweep_forward_mode_rows():
    """--jvp: a row per case in forward mode (the output and its tangent), 3x the forward's
    FLOPs; fasttransformer's JVP kernel against torch's math backend, and torch's backends
    without a forward-mode derivative reported n/a with the reason. The call it times gives the
    tangent torch's math gives."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = attention.sweep(device, masks=("causal", "padding"), head_dims=(16,), seqlens=(64,), modes=("jvp",),
                             dtype=torch.float32, tokens=128, hidden=32,
                             implementations=("fasttransformer", "torch-math", "torch-flash", "naive"))
    causal, padding = record["results"]
    assert (causal["mode"], padding["mode"]) == ("jvp", "jvp")
    assert causal["flops"] == attention.flops(2 * 2 * 64 * 64 // 2, 16, "jvp") == 3 * attention.flops(
        2 * 2 * 64 * 64 // 2, 16, "fwd")
    for row in (causal, padding):
        assert {"fasttransformer", "torch-math", "naive"} <= set(row["times_ms"])
        assert "torch-flash" in row["not_run"]
    assert "| causal | 16 | 64 | jvp |" in attention.markdown(record)
    case = attention.Case("padding", 64, 16, device, torch.float32, tokens=128, hidden=32)
    torch.testing.assert_close(case.run(case.ours, "jvp"), case.run(case.sdpa("MATH"), "jvp"), rtol=1e-4, atol=1e-4)
    assert case.q.requires_grad and forward_ad_free(case.q)


def forward_ad_free(tensor):
    """The Case's inputs are left as they were: no tangent attached outside the timed call."""
    import torch.autograd.forward_ad as forward_ad
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(tensor).tangent is None


def test_attention_sweep_value_head_dim():
    """--value-head-dim: V, O and dO have it, the FLOPs and bytes count it, every baseline gets
    the same inputs (torch's flash backend refuses D != Dv: n/a with its reason), and the table
    shows "D/Dv"."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = attention.sweep(device, masks=("padding",), head_dims=(16,), seqlens=(32,), dtype=torch.float32,
                             tokens=64, hidden=32, implementations=("fasttransformer", "torch-math", "naive"),
                             modes=("fwd",), head_dim_v=40)
    row, = record["results"]
    assert (row["head_dim"], row["head_dim_v"]) == (16, 40)
    visible = row["visible_fraction"] * 2 * 2 * 32 * 32
    assert row["flops"] == pytest.approx(attention.flops(round(visible), 16, "fwd", 40))
    assert row["bytes"] == attention.bytes_moved(2, 2, 32, 16, 4, "fwd", head_dim_v=40)
    assert {"fasttransformer", "torch-math", "naive"} <= set(row["times_ms"]), row["not_run"]
    assert "| padding | 16/40 | 32 | fwd |" in attention.markdown(record)
    case = attention.Case("none", 32, 16, device, torch.float32, 64, 32, head_dim_v=40)
    assert case.v.shape[-1] == case.grad.shape[-1] == 40
    outputs = [case.run(fn, "fwd") for fn in (case.ours, case.naive, case.sdpa("MATH"))]
    assert all(out.shape == (2, 2, 32, 40) for out in outputs)
    torch.testing.assert_close(outputs[0], outputs[1])


def test_attention_sweep_checkpoints_partial_records():
    """After every case but the last, the sweep hands the record so far to ``checkpoint`` marked
    partial (the CLI writes it: a sweep stopped at a deadline keeps what it timed); its table
    says so. The finished record is not marked."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    partials = []
    record = attention.sweep(device, masks=("none", "causal"), head_dims=(16,), seqlens=(64,), modes=("fwd",),
                             dtype=torch.float32, tokens=128, hidden=32, implementations=("torch-math",),
                             checkpoint=lambda partial: partials.append(json.loads(json.dumps(partial))))
    assert [partial["partial"] for partial in partials] == ["1 of 2 cases"]
    assert [row["mask"] for row in partials[0]["results"]] == ["none"]
    assert "Partial record: the run stopped after 1 of 2 cases." in attention.markdown(partials[0])
    assert "partial" not in record and len(record["results"]) == 2
    assert "Partial record" not in attention.markdown(record)


def test_attention_sweep_decode_rows():
    """A decoding step (one query per sequence): forward rows only, its bytes and GB/s."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = attention.sweep(device, masks=("decode",), head_dims=(16,), seqlens=(64,), dtype=torch.float32,
                             tokens=128, hidden=32, implementations=("fasttransformer", "torch-math"))
    row, = record["results"]
    assert (row["mode"], row["seqlen_q"], row["batch"], row["heads"]) == ("fwd", 1, 2, 2)
    assert row["flops"] == attention.flops(2 * 2 * 64, 16, "fwd") and row["visible_fraction"] == 1.0
    assert row["bytes"] == attention.bytes_moved(2, 2, 64, 16, 4, "fwd", seqlen_q=1)
    assert row["gbps"]["torch-math"] == pytest.approx(row["bytes"] / row["times_ms"]["torch-math"] / 1e6)
    assert "% of copy)" in attention.markdown(record)


def test_attention_sweep_gqa_decode_rows():
    """A GQA decoding step: K and V have a quarter of the query heads, and its bytes count them so."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = attention.sweep(device, masks=("decode-gqa",), head_dims=(16,), seqlens=(64,), dtype=torch.float32,
                             tokens=128, hidden=128, implementations=("fasttransformer", "unpacked", "torch-math"))
    row, = record["results"]
    assert (row["mode"], row["seqlen_q"], row["batch"], row["heads"], row["kv_heads"]) == ("fwd", 1, 2, 8, 2)
    assert row["flops"] == attention.flops(2 * 8 * 64, 16, "fwd")
    assert row["bytes"] == 2 * (2 * 8 * 16 + 2 * 2 * 64 * 16) * 4  # Q and O of 8 heads, K and V of 2
    assert row["bytes"] == attention.bytes_moved(2, 8, 64, 16, 4, "fwd", seqlen_q=1, kv_heads=2)
    assert {"fasttransformer", "unpacked", "torch-math"} <= row["times_ms"].keys()
    assert "| decode-gqa | 16 | 64 | fwd | 100% |" in attention.markdown(record)


@pytest.mark.parametrize("mask,heads", [("verify-gqa", 8), ("verify-gqa7", 14)])
def test_attention_sweep_verify_gqa_rows(monkeypatch, mask, heads):
    """A speculative decoding step's verification: 4 drafts per sequence, causal lower right, K
    and V with a quarter of the query heads (verify-gqa7: a seventh, the same key heads); its
    FLOPs count the visible pairs (draft i sees L - 4 + i + 1 keys) and its bytes the 4
    queries; ours is launched packed, one program per key head, and "unpacked" is timed beside
    it."""
    import fasttransformer.kernels.attention_forward as forward_kernels
    kernel, packing = forward_kernels.attention_forward_kernel, set()

    class Recording:  # each launch's heads and packing, then the launch itself
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                packing.add((grid[1], kwargs["PACK_GQA"]))
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(forward_kernels, "attention_forward_kernel", Recording())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = attention.sweep(device, masks=(mask,), head_dims=(16,), seqlens=(64,), dtype=torch.float32,
                             tokens=128, hidden=128, implementations=("fasttransformer", "unpacked", "torch-math"))
    row, = record["results"]
    assert (row["mode"], row["seqlen_q"], row["batch"], row["heads"], row["kv_heads"]) == ("fwd", 4, 2, heads, 2)
    visible = 2 * heads * (61 + 62 + 63 + 64)
    assert row["flops"] == attention.flops(visible, 16, "fwd")
    assert row["visible_fraction"] == visible / (2 * heads * 4 * 64)
    assert row["bytes"] == 2 * (2 * heads * 4 * 16 + 2 * 2 * 64 * 16) * 4  # Q and O of 4 drafts, K and V of 2 heads
    assert {"fasttransformer", "unpacked", "torch-math"} <= row["times_ms"].keys()
    assert f"| {mask} | 16 | 64 | fwd | 98% |" in attention.markdown(record)
    assert packing == {(2, True), (heads, False)}  # ours packed per key head; "unpacked" per query head


def test_attention_sweep_with_dropout():
    """--dropout reaches the implementations that have dropout (their outputs then differ from
    the dropout-free naive one) and FlexAttention, which has none, is n/a with the reason."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = attention.sweep(device, masks=("padding",), head_dims=(16,), seqlens=(64,), modes=("fwd",),
                             dtype=torch.float32, tokens=128, hidden=32, dropout_p=0.3,
                             implementations=("fasttransformer", "torch-math", "flex"))
    (row,) = record["results"]
    assert record["dropout_p"] == 0.3 and {"fasttransformer", "torch-math"} <= set(row["times_ms"])
    assert row["not_run"]["flex"] == "NotImplementedError: FlexAttention has no dropout"
    assert ", dropout 0.3." in attention.markdown(record)
    case = attention.Case("padding", 64, 16, device, torch.float32, tokens=128, hidden=32, dropout_p=0.3)
    plain = attention.Case("padding", 64, 16, device, torch.float32, tokens=128, hidden=32)
    plain.q, plain.k, plain.v, plain.ours_kwargs = case.q, case.k, case.v, case.ours_kwargs
    plain.allowed = case.allowed
    with torch.no_grad():
        expected = plain.naive()
        for name in ("fasttransformer", "torch-math", "naive"):
            result = case.implementations()[name]()
            assert not torch.allclose(result, expected), name  # dropped: not the plain attention


def test_attention_sweep_autotuned_column(tmp_path, monkeypatch):
    """--autotune: the "autotuned" implementation times the kernels with autotuning on for its
    own calls (its first call of a case tunes it: the autotune file then holds the case), and the
    table shows its column; records without it show none. Off CUDA it is n/a with the reason,
    unless the test lets autotune tune CPU calls (one candidate, for time)."""
    from fasttransformer.bench.cli import build_parser
    from fasttransformer.kernels.configs import Config
    from fasttransformer.ops import autotune
    assert build_parser().parse_args(["attention", "--autotune"]).autotune
    assert "autotuned" not in attention.DEFAULT_IMPLEMENTATIONS
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "tuned.json"))
    monkeypatch.setattr(autotune, "ENABLED", False)
    monkeypatch.setattr(autotune, "candidates", lambda kernel, dtype, seqlen_q: [Config(32, 32, 4, 1)])
    monkeypatch.setattr(autotune, "STAGES", ())
    autotune.clear_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sweep = dict(masks=("causal",), head_dims=(16,), seqlens=(64,), modes=("fwd",), dtype=torch.float32, tokens=128,
                 hidden=32, implementations=("fasttransformer", "autotuned"))
    if device == "cpu":
        row, = attention.sweep(device, **sweep)["results"]
        assert row["not_run"]["autotuned"] == ("NotImplementedError: autotune tunes the Triton kernels' calls on "
                                               "CUDA only")
        monkeypatch.setattr(autotune, "DEVICE_TYPES", ("cuda", "cpu"))
    try:
        record = attention.sweep(device, **sweep)
    finally:
        autotune.clear_memory()
    row, = record["results"]
    assert {"fasttransformer", "autotuned"} <= set(row["times_ms"]), row["not_run"]
    assert autotune.ENABLED is False  # on for the autotuned calls only
    entries = json.loads((tmp_path / "tuned.json").read_text())["entries"]
    assert [name.split("/")[0] for name in entries] == ["forward"]
    assert "| vs autotuned |" in attention.markdown(record)
    assert "autotuned" not in attention.markdown(synthetic_attention_record())


@pytest.mark.parametrize("subject,module", [("embedding", embedding), ("model", model)])
def test_committed_markdown_is_rendered_from_its_json(subject, module):
    record = json.loads((CPU_RESULTS / f"{subject}.json").read_text())
    assert module.markdown(record) == (CPU_RESULTS / f"{subject}.md").read_text()


def test_readme_performance_section_is_rendered_from_the_results():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_readme.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    readme = (ROOT / "README.md").read_text()
    record = json.loads((CPU_RESULTS / "model.json").read_text())
    generation = record["results"][-1]
    assert f"| {generation['subject']} | {generation['speedup']:.2f}x |" in readme


def test_render_readme_from_a_recorded_gpu_json(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_readme

    folder = tmp_path / "2026-01-01-h100"
    folder.mkdir()
    (folder / "attention.json").write_text(json.dumps(synthetic_attention_record()))
    text = render_readme.render("intro\n<!-- performance:start -->old<!-- performance:end -->\nrest", tmp_path)
    assert text.startswith("intro\n<!-- performance:start -->") and text.endswith("<!-- performance:end -->\nrest")
    assert "### attention: Synthetic GPU (2026-01-01-h100)" in text
    assert "| causal | 128 | 4096 | fwd | 500 (62%)" in text
    assert "| decode | 128 | 8192 | fwd | 2500 GB/s (83% of copy) |" in text
    assert "old" not in text


@pytest.mark.parametrize("argv,pattern", [
    (["bench", "attention", "--mask", "diagonal"], "--mask 'diagonal' is not one of"),
    (["bench", "attention", "--head-dim", "512"], "--head-dim must be <= 256"),
    (["bench", "attention", "--value-head-dim", "0"], r"--value-head-dim must be in \[1, 256\]"),
    (["bench", "attention", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["bench", "attention", "--dropout", "1.5"], r"--dropout must be in \[0, 1\)"),
    (["bench", "attention", "--mask", "decode", "--bwd"], "a decoding step is timed forward only"),
    (["bench", "attention", "--mask", "decode", "--mask", "decode-gqa", "--bwd"],
     "a decoding step is timed forward only"),
    (["bench", "attention", "--mask", "decode", "--jvp"], "--jvp with --mask decode times nothing"),
    (["bench", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "--seq-len", "-1"],
     "no CUDA device here" if not torch.cuda.is_available() else "--seq-len must be >= 1"),
])
def test_bench_rejects_bad_arguments(argv, pattern):
    with pytest.raises(SystemExit, match=pattern):
        main(argv)


def test_bench_checks_its_out_folder_before_the_sweeps(tmp_path, monkeypatch):
    from fasttransformer.bench import embedding
    monkeypatch.setattr(embedding, "sweep", lambda *args: pytest.fail("the sweep ran before --out was checked"))
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit, match="--out .*afile: not a folder"):
        main(["bench", "embedding", "--device", "cpu", "--out", str(afile)])
    with pytest.raises(SystemExit, match="--out .*afile/results: cannot create the folder"):
        main(["bench", "embedding", "--device", "cpu", "--out", str(afile / "results")])


def test_bench_rejects_unknown_subject(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "everything"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    ([str(ROOT / "fasttransformer" / "__main__.py"), "bench", "--quick"], "python -m fasttransformer bench --quick"),
    (["/home/u/.venv/bin/fasttransformer", "bench", "--out", "a b"], "python -m fasttransformer bench --out 'a b'"),
    ([str(ROOT / "benchmarks" / "tune_attention.py"), "--masks", "decode"],
     "python benchmarks/tune_attention.py --masks decode"),
    (["/elsewhere/run.py", "-x"], "python /elsewhere/run.py -x"),
    ([], "python"),
], ids=["python-m", "console-script", "in-checkout", "outside", "empty"])
def test_results_record_the_command_a_user_would_type(argv, expected):
    from fasttransformer.bench.common import command_line
    assert command_line(argv) == expected


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run: on a GPU machine `make gpu-check` runs the sweep")
def test_bench_quick_on_cpu_end_to_end(tmp_path, capsys):
    assert main(["bench", "all", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GPU subjects skipped" in out and "Skipped: no CUDA GPU" in out
    for subject in ("attention", "embedding", "model"):
        record = json.loads((tmp_path / f"{subject}.json").read_text())
        assert record["benchmark"] == subject
        assert (tmp_path / f"{subject}.md").read_text().startswith(f"# {subject.capitalize()} benchmark")
    embedding_record = json.loads((tmp_path / "embedding.json").read_text())
    assert {"environment", "ceilings", "results"} <= embedding_record.keys()
    row = embedding_record["results"][0]
    assert row["fwd_ms_fused"] > 0 and row["fwd_speedup"] == pytest.approx(row["fwd_ms_unfused"] / row["fwd_ms_fused"])
    model_record = json.loads((tmp_path / "model.json").read_text())
    assert [r["subject"] for r in model_record["results"]][-1].startswith("generate")


TINY = ["--d-model", "32", "--nhead", "2", "--layers", "1", "--dim-feedforward", "64", "--vocab", "50",
        "--seq-len", "16", "--batch", "2", "--device", "cpu"]


@pytest.mark.parametrize("mode", ["train", "generate"])
def test_profile_prints_top_operators_and_writes_a_trace(tmp_path, capsys, mode):
    from fasttransformer import profile

    trace = tmp_path / "traces" / "trace.json"  # a folder that does not exist yet: created
    args = profile.build_parser().parse_args(["--mode", mode, "--steps", "1", "--warmup", "1", "--new-tokens", "4",
                                              "--trace", str(trace), *TINY])
    result = profile.run(args)
    out = capsys.readouterr().out
    assert "operator / kernel" in out and f"{mode} step of Seq2SeqTransformer" in out
    shares = [share for _, _, _, share in result["rows"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"ft.MultiheadAttention", "ft.TransformerDecoderLayer", "ft.TokenPositionalEmbedding"} <= names
    assert ("step.backward" in names) == (mode == "train")


def test_profile_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--ncu-range needs a CUDA device"):
        main(["profile", "--ncu-range", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["profile", "--steps", "0", *TINY])
    with pytest.raises(SystemExit, match="must be a multiple of --nhead"):
        main(["profile", *TINY, "--nhead", "3"])
    with pytest.raises(SystemExit, match="--top must be >= 1"):
        main(["profile", *TINY, "--top", "0"])
    with pytest.raises(SystemExit, match="--trace .*: is a folder"):  # before any step runs
        main(["profile", *TINY, "--trace", str(tmp_path)])
    with pytest.raises(SystemExit, match="--trace /proc/.*: cannot create the folder"):
        main(["profile", *TINY, "--trace", "/proc/fasttransformer/trace.json"])
    with pytest.raises(SystemExit) as error:
        main(["profile", *TINY, "--device", "tpu"])
    assert error.value.code == 2 and "argument --device: 'tpu' is not a device" in capsys.readouterr().err


def test_profile_says_so_when_torch_did_not_write_the_trace(tmp_path, monkeypatch):
    """torch's profiler only logs a failed export; an old file at the path must not pass for it."""
    trace = tmp_path / "trace.json"
    trace.write_text("an older trace")
    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", lambda self, path: None)
    with pytest.raises(SystemExit, match="the trace was not written"):
        main(["profile", *TINY, "--steps", "1", "--warmup", "0", "--trace", str(trace)])


# --- benchmarks/tune_attention.py: the config tuner (its times mean something only on a GPU) -------

def test_tune_attention_plumbing_on_cpu(tmp_path):
    """The tuner end to end at toy sizes under the interpreter: every candidate AOT-compiled
    for sm_90 (spawned workers) and timed against the table's entry, which comes first; the
    fastest is the minimum; a spilling candidate would be skipped, not timed. Run as on the GPU
    machine, from a checkout with nothing installed: without site (-S), torch's site-packages on
    PYTHONPATH, so fasttransformer is found only through the script's own path."""
    command = [sys.executable, "-S", str(ROOT / "benchmarks" / "tune_attention.py"), "--device", "cpu", "--out",
               str(tmp_path), "--kernels", "forward,dq,jvp", "--head-dims", "32", "--masks", "causal", "--seqlen", "64",
               "--tokens", "64", "--hidden", "32", "--candidates", "32x32x4x1", "--warm-workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "TRITON_INTERPRET": "1",
                                 "PYTHONPATH": str(Path(torch.__file__).parents[1])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "JIT-compiled 6 candidates in 1 workers" in result.stdout  # table entry + 1, for 3 kernels
    record = json.loads((tmp_path / "tune.json").read_text())
    assert record["arch"] == 90
    for kernel in ("forward", "dq", "jvp"):
        rows = [row for row in record["results"] if row["kernel"] == kernel]
        assert rows[0]["table_entry"] and [row["config"] for row in rows[1:]] == [[32, 32, 4, 1]]
        assert all(row["stack_bytes"] == 0 and row["registers"] > 0 and row["ms"] > 0 for row in rows), rows
        assert record["fastest"][f"{kernel}/32/causal"] == min(rows, key=lambda row: row["ms"])["config"]
    assert "| forward | 32 | causal |" in (tmp_path / "tune.md").read_text()


def test_tune_attention_times_decoding_steps_forward_only(tmp_path):
    """--masks decode-gqa: the forward of a GQA decoding step (one query per sequence, 4 query
    heads per key head), the backward and JVP kernels left out, in GB/s of the bytes the
    benchmark counts (hand-computed here), over the decode grid's smaller query blocks."""
    command = [sys.executable, str(ROOT / "benchmarks" / "tune_attention.py"), "--device", "cpu", "--out",
               str(tmp_path), "--kernels", "forward,dq,jvp", "--head-dims", "32", "--masks", "decode-gqa",
               "--seqlen", "96", "--tokens", "192", "--hidden", "256", "--candidates", "16x32x4x1",
               "--warm-workers", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "tune.json").read_text())
    rows = record["results"]
    assert {row["kernel"] for row in rows} == {"forward"} and [row["config"] for row in rows[1:]] == [[16, 32, 4, 1]]
    batch, heads, kv_heads, seqlen, head_dim = 2, 8, 2, 96, 32  # 192 tokens / 96; 256 hidden / 32; 8 / 4
    assert all(row["shape"] == [batch, heads, 1, head_dim] for row in rows)
    moved = 2 * 2 * (batch * heads * 1 * head_dim + batch * kv_heads * seqlen * head_dim)  # fp16: Q, O; K, V
    for row in rows:
        assert row["gbps"] == pytest.approx(moved / row["ms"] / 1e6)
    assert "| forward | 32 | decode-gqa |" in (tmp_path / "tune.md").read_text()
    from importlib import util
    spec = util.spec_from_file_location("tune_attention", ROOT / "benchmarks" / "tune_attention.py")
    tune = util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    grid = tune.candidates(tune.parse_args(["--out", "x", "--masks", "decode"]), None, "decode")
    assert {config.block_m for config in grid[1:]} == {16, 32, 64, 128}


@pytest.mark.parametrize("mask,heads", [("verify-gqa", 8), ("verify-gqa7", 14)])
def test_tune_attention_times_speculative_verification_packed(tmp_path, monkeypatch, mask, heads):
    """--masks verify-gqa: 4 drafts per sequence (causal, lower right) with decode-gqa's heads
    (verify-gqa7: 7 query heads per key head), forward only, in GB/s; its candidates are
    compiled ahead of time as the packed kernel (PACK_GQA) and launched packed, (draft, head)
    pairs as rows (one program per key head)."""
    from importlib import util
    spec = util.spec_from_file_location("tune_attention", ROOT / "benchmarks" / "tune_attention.py")
    tune = util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    compiled = []
    tune.aot_filter = lambda jobs, processes: compiled.extend(jobs) or {
        job: {"registers": 100, "stack_bytes": 0} for job in jobs}
    import fasttransformer.kernels.attention_forward as forward_kernels
    kernel, launches = forward_kernels.attention_forward_kernel, []

    class Recording:  # each launch's grid, packing, query length and causal offset, then the launch itself
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(kernel.arg_names, args))
                launches.append((grid[1:], (kwargs["PACK_GQA"], named["seqlen_q"], named["causal_offset"])))
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(forward_kernels, "attention_forward_kernel", Recording())
    assert tune.main(["--device", "cpu", "--out", str(tmp_path), "--kernels", "forward,dq", "--head-dims", "32",
                      "--masks", mask, "--seqlen", "96", "--tokens", "192", "--hidden", "256",
                      "--candidates", "32x32x4x1", "--warm-workers", "0"]) == 0
    assert {job[4] for job in compiled} == {True} and {job[0] for job in compiled} == {"forward"}
    rows = json.loads((tmp_path / "tune.json").read_text())["results"]
    batch, kv_heads, seqlen, head_dim = 2, 2, 96, 32
    assert [row["config"] for row in rows[1:]] == [[32, 32, 4, 1]] and all("gbps" in row for row in rows)
    assert all(row["shape"] == [batch, heads, 4, head_dim] for row in rows)
    # the inputs' forward, then the timing's: packed, 4 drafts seeing keys up to 96 - 4 + i
    assert launches and set(launches) == {((kv_heads, batch), (True, 4, seqlen - 4))}


def test_tune_attention_rejects_bad_arguments():
    command = [sys.executable, str(ROOT / "benchmarks" / "tune_attention.py"), "--out", "/tmp/x", "--kernels", "fwd"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--kernels must be among" in result.stderr
    command[-1] = "dq"
    result = subprocess.run([*command, "--masks", "decode"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--kernels must include forward" in result.stderr


# --- benchmarks/bench_*.py: the pytest-benchmark suites ---------------------------------------------

def test_pytest_benchmark_suites_collect_and_record(tmp_path):
    """`pytest benchmarks/` finds every suite (bench_*.py), and the attention suite runs on the CPU:
    a benchmark per (mask, mode) for fasttransformer with its case in extra_info, and a baseline
    that cannot run skipped with its reason."""
    pytest_command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    # not an xdist worker's: pytest-benchmark turns itself off in a process that inherits one
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    collected = subprocess.run([*pytest_command, "benchmarks", "--collect-only", "-q"], cwd=ROOT, capture_output=True,
                               text=True, timeout=300, env=env)
    assert collected.returncode == 0, collected.stdout[-3000:]
    for suite in ("bench_attention.py::test_attention", "bench_embedding.py::test_embedding",
                  "bench_model.py::test_model"):
        assert suite in collected.stdout
    record_path = tmp_path / "attention.json"
    ran = subprocess.run([*pytest_command, "benchmarks/bench_attention.py", "-k", "cpu", "-rs",
                          "--benchmark-min-rounds=1", "--benchmark-max-time=0.001", f"--benchmark-json={record_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert "n/a: RuntimeError: No viable backend" in ran.stdout  # torch's CUDA-only backends on the CPU
    benchmarks = json.loads(record_path.read_text())["benchmarks"]
    ours = {(b["extra_info"]["mask"], b["extra_info"]["mode"]): b for b in benchmarks
            if b["extra_info"]["impl"] == "fasttransformer"}
    assert sorted(ours) == sorted([(mask, mode) for mask in ("none", "causal", "padding", "document")
                                   for mode in ("fwd", "fwd+bwd")]
                                  + [(mask, "fwd") for mask in ("decode", "decode-gqa", "verify-gqa", "verify-gqa7")])
    assert all(b["stats"]["median"] > 0 and b["extra_info"]["visible_pairs"] > 0 for b in ours.values())


# --- make gpu-check: the test suite in shards ----------------------------------------------------

def test_test_shards_partition_the_suite():
    """FASTTRANSFORMER_TEST_SHARD=i/n (tests/conftest.py): the shards together hold every test once."""
    def collect(shard=None):
        env = {key: value for key, value in os.environ.items() if key != "FASTTRANSFORMER_TEST_SHARD"}
        if shard:
            env["FASTTRANSFORMER_TEST_SHARD"] = shard
        result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                                 "tests/test_reference.py", "tests/test_cli.py"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        return result, [line for line in result.stdout.splitlines() if "::" in line]

    _, everything = collect()
    shards = [collect(f"{index}/3")[1] for index in range(3)]
    assert len(everything) > 6 and all(shards)
    assert sorted(sum(shards, [])) == sorted(everything)
    bad, _ = collect("3/3")
    assert bad.returncode != 0 and "FASTTRANSFORMER_TEST_SHARD must be i/n" in bad.stdout + bad.stderr


# --- benchmarks/sass_loops.py: instructions per loop iteration, from the SASS ----------------------

def test_sass_loops_counts_each_loop_body():
    """A backward branch closes a loop: its body is counted from the branch's target to the branch
    (an outer loop including its inner one), a forward branch is no loop, and predicates do not
    change an opcode's name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_loops

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x1, PT ;
        /*0020*/               @P0 BRA 0x80 ;
        /*0030*/                   FMUL R2, R2, R3 ;
        /*0040*/                   FFMA R4, R2, R3, R4 ;
        /*0050*/              @!P1 FMUL R2, R2, R3 ;
        /*0060*/                   ISETP.NE.AND P1, PT, R5, RZ, PT ;
        /*0070*/               @P1 BRA 0x40 ;
        /*0080*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0090*/               @P2 BRA `(.L_x_1) 0x30 ;
        /*00a0*/                   EXIT ;
    """
    total, found = sass_loops.loops(sass)
    assert total == 11
    assert [loop["instructions"] for loop in found] == [4, 7]
    assert found[0]["opcodes"] == {"FFMA": 1, "FMUL": 1, "ISETP": 1, "BRA": 1}
    assert found[1]["opcodes"]["FMUL"] == 2 and found[1]["opcodes"]["BRA"] == 2
