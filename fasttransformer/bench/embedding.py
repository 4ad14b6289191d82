"""Fused token embedding + positional encoding against torch's unfused chain.

The unfused chain is what users write today: ``F.embedding(ids, w) * scale + pe[:L]`` with a
precomputed sinusoid table, then dropout. Both run on the same inputs in the same process.
Bytes counted per token: the embedding row read and the output row written (2 * d * itemsize);
the fused kernel reads no position table.

    python -m fasttransformer bench embedding [--quick] [--out DIR]   # JSON + Markdown + plot
    pytest benchmarks/bench_embedding.py --benchmark-json=FILE         # pytest-benchmark
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fasttransformer import reference
from fasttransformer.bench import common
from fasttransformer.ops import token_positional_embedding

VOCAB = 32768
TOKENS = 16384  # batch 16 x length 1024
DROPOUT = 0.1


class Case:
    """Inputs for one (device, dtype, d): rotated id sets so repeated runs do not reuse rows."""

    def __init__(self, device, dtype, dim, batch=16, seq_len=TOKENS // 16, id_sets=4):
        self.device, self.dtype, self.dim, self.seq_len = device, dtype, dim, seq_len
        self.weight = (torch.randn(VOCAB, dim, device=device, dtype=dtype) * dim**-0.5).requires_grad_()
        self.ids = [torch.randint(0, VOCAB, (batch, seq_len), device=device) for _ in range(id_sets)]
        self.pe = reference.sinusoidal_positions(torch.arange(seq_len, device=device), dim).to(dtype)
        self.grad = torch.randn(batch, seq_len, dim, device=device, dtype=dtype)
        self.scale, self.turn = math.sqrt(dim), 0

    def next_ids(self):
        self.turn = (self.turn + 1) % len(self.ids)
        return self.ids[self.turn]

    def fused(self, dropout_p):
        return token_positional_embedding(self.next_ids(), self.weight, scale=self.scale, dropout_p=dropout_p)

    def fused_unchecked(self, dropout_p):
        """check_ids=False: no host synchronisation to turn a bad id into a Python error (CUDA)."""
        return token_positional_embedding(self.next_ids(), self.weight, scale=self.scale, dropout_p=dropout_p,
                                          check_ids=False)

    def unfused(self, dropout_p):
        ids = self.next_ids()
        x = F.embedding(ids, self.weight) * self.scale + self.pe[: ids.shape[1]]
        return F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x

    def step(self, impl, dropout_p):
        """Forward + backward, gradient freshly allocated as in a training step."""
        self.weight.grad = None
        getattr(self, impl)(dropout_p).backward(self.grad)

    def forward(self, impl, dropout_p):
        with torch.no_grad():
            return getattr(self, impl)(dropout_p)

    def bytes_per_forward(self):
        return 2 * TOKENS * self.dim * self.dtype.itemsize


def sweep(device: str, quick: bool) -> dict:
    dims = [512, 1024] if quick else [512, 1024, 4096]
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    if quick and device == "cpu":
        dtypes = [torch.float32]
    record = {"benchmark": "embedding", "environment": common.environment(device),
              "ceilings": common.ceilings(device), "tokens": TOKENS, "vocab": VOCAB, "results": []}
    copy_gbps = record["ceilings"]["copy_gbps"]
    for dtype in dtypes:
        for dim in dims:
            case = Case(device, dtype, dim)
            for dropout_p in (0.0, DROPOUT):
                row = {"dtype": str(dtype).replace("torch.", ""), "dim": dim, "dropout": dropout_p}
                for impl in ("fused", "unfused"):
                    row[f"fwd_ms_{impl}"] = common.time_ms(lambda: case.forward(impl, dropout_p), device)
                    row[f"fwd_bwd_ms_{impl}"] = common.time_ms(lambda: case.step(impl, dropout_p), device)
                if device == "cuda":  # on the CPU the check costs no synchronisation
                    row["fwd_ms_fused_unchecked"] = common.time_ms(lambda: case.forward("fused_unchecked", dropout_p),
                                                                   device)
                row["fwd_gbps_fused"] = case.bytes_per_forward() / row["fwd_ms_fused"] / 1e6
                row["fwd_fraction_of_copy"] = row["fwd_gbps_fused"] / copy_gbps
                row["fwd_speedup"] = row["fwd_ms_unfused"] / row["fwd_ms_fused"]
                row["fwd_bwd_speedup"] = row["fwd_bwd_ms_unfused"] / row["fwd_bwd_ms_fused"]
                record["results"].append(row)
                print(markdown_row(row), flush=True)
            del case
    return record


HEADER = ("| dtype | d | dropout | fwd fused ms | fwd unfused ms | fwd speedup | fused GB/s | % of copy "
          "| fwd+bwd fused ms | fwd+bwd unfused ms | fwd+bwd speedup |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(row: dict) -> str:
    return (f"| {row['dtype']} | {row['dim']} | {row['dropout']} | {row['fwd_ms_fused']:.4f} | "
            f"{row['fwd_ms_unfused']:.4f} | {row['fwd_speedup']:.2f}x | {row['fwd_gbps_fused']:.0f} | "
            f"{100 * row['fwd_fraction_of_copy']:.0f}% | {row['fwd_bwd_ms_fused']:.4f} | "
            f"{row['fwd_bwd_ms_unfused']:.4f} | {row['fwd_bwd_speedup']:.2f}x |")


def markdown(record: dict) -> str:
    env, ceil = record["environment"], record["ceilings"]
    lines = [f"# Embedding benchmark: {env['device']}",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
             f"{record['tokens']} tokens, vocab {record['vocab']}. Command: `{env['command']}`",
             f"Measured ceilings: copy {ceil['copy_gbps']:.0f} GB/s, {ceil['matmul_dtype']} matmul "
             f"{ceil['matmul_tflops']:.1f} TFLOP/s.", "", HEADER]
    lines += [markdown_row(row) for row in record["results"]]
    unchecked = [row for row in record["results"] if "fwd_ms_fused_unchecked" in row]
    if unchecked:
        lines += ["", "Forward with `check_ids=False` (no host synchronisation):", "",
                  "| dtype | d | dropout | fwd ms | GB/s | % of copy |", "|---|---|---|---|---|---|"]
        for row in unchecked:
            gbps = row["fwd_gbps_fused"] * row["fwd_ms_fused"] / row["fwd_ms_fused_unchecked"]
            lines.append(f"| {row['dtype']} | {row['dim']} | {row['dropout']} | {row['fwd_ms_fused_unchecked']:.4f} | "
                         f"{gbps:.0f} | {100 * gbps / record['ceilings']['copy_gbps']:.0f}% |")
    return "\n".join(lines) + "\n"
