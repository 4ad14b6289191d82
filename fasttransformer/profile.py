"""``python -m fasttransformer profile``: where the time of a Seq2SeqTransformer step goes.

Runs a few warm-up steps, then profiles ``--steps`` training (or generation) steps under
``torch.profiler``, with a ``record_function`` range around every fasttransformer module call
(``ft.MultiheadAttention``, ``ft.TransformerDecoderLayer``, ``ft.TokenPositionalEmbedding``, ...)
and around the phases of a step (``step.forward``, ``step.backward``, ``step.optimizer``). Prints
the top operators and kernels by self time with their share of the profiled time, and writes a
Chrome/Perfetto trace (open it in https://ui.perfetto.dev or chrome://tracing).

``--ncu-range`` (CUDA): the profiled steps run between cudaProfilerStart/Stop with NVTX ranges
for every op, for Nsight Compute:
``ncu --profile-from-start off --nvtx -o step python -m fasttransformer profile --ncu-range``.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from fasttransformer._cli import device_type, output_file, resolve_device

SIZES = {  # the defaults per device: Transformer-base on a GPU, a small model on the CPU
    "cuda": dict(d_model=512, nhead=8, layers=6, dim_feedforward=2048, vocab=32768, seq_len=512, batch=32),
    "cpu": dict(d_model=256, nhead=4, layers=2, dim_feedforward=1024, vocab=8192, seq_len=128, batch=8),
}


def build_parser(parser=None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fasttransformer profile")
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--mode", choices=["train", "generate"], default="train",
                        help="a training step, or greedy generation of --new-tokens tokens (default: train)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before profiling (default: 2)")
    for name in ("d_model", "nhead", "layers", "dim_feedforward", "vocab", "seq_len", "batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default: {SIZES['cuda'][name]} on a GPU, {SIZES['cpu'][name]} on the CPU")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per generation step (default: 32)")
    parser.add_argument("--device", type=device_type, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--no-autocast", action="store_true", help="on CUDA, run in float32 instead of bf16 autocast")
    parser.add_argument("--top", type=int, default=15, help="rows of the table (default: 15)")
    parser.add_argument("--trace", default="fasttransformer-trace.json", help="Chrome trace output path")
    parser.add_argument("--ncu-range", action="store_true",
                        help="CUDA: wrap the profiled steps in cudaProfilerStart/Stop and NVTX ranges (for ncu)")
    return parser


def run(args) -> dict:
    from fasttransformer.models import Seq2SeqTransformer

    device = resolve_device(args.device)
    if args.ncu_range and device.type != "cuda":
        raise SystemExit("--ncu-range needs a CUDA device")
    sizes = {name: getattr(args, name) or default for name, default in SIZES[device.type].items()}
    for name, value in [*sizes.items(), ("steps", args.steps), ("new_tokens", args.new_tokens), ("top", args.top)]:
        if value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if sizes["d_model"] % sizes["nhead"]:
        raise SystemExit(f"--d-model ({sizes['d_model']}) must be a multiple of --nhead ({sizes['nhead']})")
    trace = output_file(args.trace, "--trace")  # before the steps: torch's export only logs a failure
    torch.manual_seed(0)
    model = Seq2SeqTransformer(sizes["vocab"], sizes["vocab"], sizes["d_model"], sizes["nhead"], sizes["layers"],
                               sizes["layers"], sizes["dim_feedforward"], dropout=0.1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, sizes["vocab"], (2, sizes["batch"], sizes["seq_len"] + 1), device=device)
    ids[..., -sizes["seq_len"] // 5:] = 0  # ~20% padding
    src, tgt = ids[0, :, :-1], ids[1]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and not args.no_autocast
                else contextlib.nullcontext())

    def step():
        if args.mode == "generate":
            model.eval()
            with autocast, torch.profiler.record_function("step.generate"):
                model.generate(src, args.new_tokens, bos_id=1, eos_id=2)
            return
        model.train()
        with autocast, torch.profiler.record_function("step.forward"):
            logits = model(src, tgt[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten(), ignore_index=0)
        with torch.profiler.record_function("step.backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with torch.profiler.record_function("step.optimizer"):
            optimizer.step()

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    ncu = (contextlib.ExitStack() if not args.ncu_range else _ncu_range())
    with _module_ranges(model), ncu, torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize()
        seconds = (time.perf_counter() - start) / args.steps
    trace.unlink(missing_ok=True)  # an old trace must not pass for this one
    profiler.export_chrome_trace(str(trace))
    if not trace.is_file() or not trace.stat().st_size:
        raise SystemExit(f"--trace {args.trace}: the trace was not written (torch's profiler logged why)")
    rows = top_operators(profiler, device.type, args.top)
    print(f"{args.mode} step of Seq2SeqTransformer {sizes} on {device}: {seconds * 1e3:.1f} ms per step "
          f"({args.steps} profiled after {args.warmup} warm-up)")
    print(render(rows, "GPU" if device.type == "cuda" else "CPU"))
    print(f"trace: {args.trace} (open in https://ui.perfetto.dev)")
    return {"ms_per_step": seconds * 1e3, "rows": rows, "trace": args.trace}


def top_operators(profiler, device_type: str, top: int) -> list:
    """[(name, calls, self ms, share)] by self time on the device that did the work; the
    ``step.*`` and ``ft.*`` ranges are not operators and are left out (they are in the trace)."""
    events = [e for e in profiler.key_averages() if not e.key.startswith(("step.", "ft.", "ProfilerStep"))]

    def self_us(event):
        if device_type == "cuda":
            return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
        return event.self_cpu_time_total

    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return [(e.key, e.count, self_us(e) / 1e3, self_us(e) / total) for e in ranked]


def render(rows, where: str) -> str:
    width = max([len(name[:70]) for name, *_ in rows] + [20])
    lines = [f"{'operator / kernel':<{width}}  {'calls':>6}  {f'self {where} ms':>12}  {'share':>6}"]
    lines += [f"{name[:70]:<{width}}  {calls:>6}  {ms:>12.3f}  {share:>6.1%}" for name, calls, ms, share in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def _module_ranges(model):
    """A record_function range around every call of a fasttransformer module (ft.<Class>)."""
    stack, handles = [], []

    def enter(module, args):
        scope = torch.profiler.record_function(f"ft.{type(module).__name__}")
        scope.__enter__()
        stack.append(scope)

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    for module in model.modules():
        if type(module).__module__.startswith("fasttransformer."):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _ncu_range():
    with torch.cuda.profiler.profile(), torch.autograd.profiler.emit_nvtx():
        yield
