"""Masked attention: fasttransformer's Triton kernels against torch SDPA with each backend forced
(flash, efficient, cudnn, math), FlexAttention (compiled, with the equivalent BlockMask) and a
naive PyTorch implementation, on the same inputs in the same process.

Shapes (issue 3): B * L = 16k tokens, 2048 hidden (H = 2048 / D), D in {64, 128}, L from 512 to
16k, bf16. FLOPs count the (query, key) pairs the mask leaves visible: forward 4 * D per pair
(QK^T and PV; 2 * (D + Dv) with ``--value-head-dim Dv``), backward 2.5x that (FlashAttention's
convention); TFLOP/s are reported against the measured bf16 matmul rate. A baseline that cannot
run a case is "n/a" with its reason.
The ``decode`` case is a decoding step: one query per sequence against L cached keys (B * L =
16k keys), forward only, reported in GB/s (K, V and Q read, O written) against the measured copy
bandwidth: with few sequences it has too few programs to fill the GPU unless the keys are split
between programs (configs.forward_splits). Its "unsplit" baseline is the same forward with one
program per query block: the speedup over it is the split keys' gain. ``decode-gqa`` is the same
step with grouped keys (Hq / Hk = GQA_GROUP, as Llama's 32 / 8), and its "unpacked" baseline the
Triton forward with one program per query head instead of one per key head (``pack_gqa=False``):
the speedup over it is the packing's gain. ``verify-gqa`` is a speculative decoding step's
verification: SPECULATIVE_QUERIES draft tokens per sequence against the L cached keys (causal,
lower right: each draft sees the cache and the drafts before it), grouped keys as decode-gqa's,
forward only, in GB/s; ``ours`` packs each key head's (draft, query head) pairs as one program's
rows, and "unpacked" is again one program per query head. ``verify-gqa7`` is verify-gqa with
QWEN2_GROUP = 7 query heads per key head (Qwen2's 28 / 4: the same keys, Hq = 7 Hk), packed with
8 rows per draft, one of them spare.

    python -m fasttransformer bench attention [--quick] [--mask causal] [--head-dim 128] ...
    python -m fasttransformer bench attention --head-dim 192 --value-head-dim 128   # DeepSeek's MLA
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from fasttransformer.bench import common
from fasttransformer.ops import scaled_dot_product_attention

TOKENS, HIDDEN = 16384, 2048
MASKS = ("none", "causal", "padding", "document", "window", "causal+padding", "decode", "decode-gqa", "verify-gqa",
         "verify-gqa7")
# a few queries per sequence: forward only, bound by the bytes read
DECODE_MASKS = ("decode", "decode-gqa", "verify-gqa", "verify-gqa7")
# Hq / Hk = GQA_GROUP (verify-gqa7: QWEN2_GROUP); "unpacked" is their packing's baseline
GQA_MASKS = ("decode-gqa", "verify-gqa", "verify-gqa7")
VERIFY_MASKS = ("verify-gqa", "verify-gqa7")  # SPECULATIVE_QUERIES drafts per sequence, causal lower right
SPECULATIVE_QUERIES = 4  # verify-gqa's queries per sequence: the drafts of a speculative decoding step
QUICK_MASKS = ("none", "causal", "padding", "document", "decode", "decode-gqa", "verify-gqa",
               "verify-gqa7")  # bench --quick
IMPLEMENTATIONS = ("fasttransformer", "torch-flash", "torch-efficient", "torch-cudnn", "torch-math", "flex", "naive",
                   "unsplit",    # decoding: fasttransformer's forward with num_splits=1
                   "unpacked",   # decode-gqa, verify-gqa(7): fasttransformer's forward with pack_gqa=False
                   "autotuned")  # fasttransformer with FASTTRANSFORMER_AUTOTUNE on (bench attention --autotune)
# Timed unless asked otherwise: all but "autotuned", whose first call of each case tunes it (tens
# of seconds, outside the timing).
DEFAULT_IMPLEMENTATIONS = tuple(name for name in IMPLEMENTATIONS if name != "autotuned")
GQA_GROUP = 4
QWEN2_GROUP = 7  # verify-gqa7's query heads per key head: a group that is not a power of two
WINDOW = 256
BACKWARD_FLOP_RATIO = 2.5


def flops(visible_pairs: int, head_dim: int, mode: str, head_dim_v: Optional[int] = None) -> float:
    """FLOPs of one call: 2 matmuls of 2 * D FLOPs per visible (query, key) pair forward (QK^T
    over D, PV over the value's head dim ``head_dim_v``, default D); the backward (5 matmuls)
    counted as 2.5x the forward; ``fwd+bwd`` both; ``jvp`` (forward mode: the output and its
    tangent) the forward and the tangent's 4 matmuls (dQ K^T and Q dK^T over D, (P dS) V and
    P dV over Dv), 3x the forward."""
    forward = 2.0 * (head_dim + (head_dim if head_dim_v is None else head_dim_v)) * visible_pairs
    return {"fwd": forward, "bwd": BACKWARD_FLOP_RATIO * forward,
            "fwd+bwd": (1 + BACKWARD_FLOP_RATIO) * forward, "jvp": 3 * forward}[mode]


def gqa_kv_heads(heads: int) -> int:
    """The key heads of a decode-gqa or verify-gqa case: GQA_GROUP query heads each (fewer where there are
    fewer heads), a divisor of ``heads``."""
    kv_heads = max(1, heads // GQA_GROUP)
    while heads % kv_heads:
        kv_heads -= 1
    return kv_heads


def bytes_moved(batch: int, heads: int, seqlen: int, head_dim: int, itemsize: int, mode: str,
                seqlen_q: Optional[int] = None, kv_heads: Optional[int] = None,
                head_dim_v: Optional[int] = None) -> int:
    """The minimum traffic of a fused kernel: read Q, K, V and write O (forward); the backward
    reads Q, K, V, O, dO and writes dQ, dK, dV; ``jvp`` reads Q, K, V and their tangents and
    writes O and its tangent. ``seqlen_q``: the queries' length (default L);
    ``kv_heads``: the keys' and values' heads (default ``heads``; GQA: fewer); ``head_dim_v``:
    the value's and output's head dim (default D)."""
    rows_kv = batch * (heads if kv_heads is None else kv_heads) * seqlen * itemsize
    rows_q = batch * heads * (seqlen if seqlen_q is None else seqlen_q) * itemsize
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    once = (rows_q + rows_kv) * (head_dim + head_dim_v)  # Q and K over D, V and O over Dv
    return {"fwd": once, "bwd": 2 * once, "fwd+bwd": 3 * once, "jvp": 2 * once}[mode]


class Case:
    """Inputs and every implementation's callable for one (mask, L, D); ``head_dim_v``: the
    value's head dim, when it differs (H = hidden / D all the same, but verify-gqa7's query
    heads: QWEN2_GROUP per key head of verify-gqa's)."""

    def __init__(self, mask: str, seqlen: int, head_dim: int, device: str, dtype=torch.bfloat16, tokens=TOKENS,
                 hidden=HIDDEN, dropout_p: float = 0.0, backend: str = "triton", head_dim_v: Optional[int] = None):
        self.mask, self.seqlen, self.head_dim, self.device, self.dtype = mask, seqlen, head_dim, device, dtype
        self.head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.backend = backend  # fasttransformer's: "auto" on the CPU times its dispatch to torch
        self.dropout_p = dropout_p  # every implementation that has dropout applies it (each its own masks)
        self.batch, self.heads = max(1, tokens // seqlen), hidden // head_dim
        # decode: one new token per sequence; verify-gqa: the drafts (at most L)
        self.seqlen_q = seqlen if mask not in DECODE_MASKS else 1
        if mask in VERIFY_MASKS:
            self.seqlen_q = min(SPECULATIVE_QUERIES, seqlen)
        self.kv_heads = gqa_kv_heads(self.heads) if mask in GQA_MASKS else self.heads
        if mask == "verify-gqa7":
            self.heads = QWEN2_GROUP * self.kv_heads
        shape = (self.batch, self.kv_heads, seqlen, head_dim)
        query_shape = (self.batch, self.heads, self.seqlen_q, head_dim)
        value_shape = (*shape[:3], self.head_dim_v)
        self.q, self.k, self.v = (torch.randn(size, device=device, dtype=dtype, requires_grad=True)
                                  for size in (query_shape, shape, value_shape))
        self.grad = torch.randn(*query_shape[:3], self.head_dim_v, device=device, dtype=dtype)
        self.ours_kwargs: dict = {}
        self.torch_kwargs: dict = {}  # torch's SDPA: the masks merged into one bool mask (True = attend)
        self.allowed = None           # (B or 1, 1, L, L) bool, for torch, naive and the FLOP count
        self.mask_mod: Optional[Callable] = None
        positions = torch.arange(seqlen, device=device)
        rows, cols = positions[:, None], positions[None, :]
        if "causal" in mask:
            self.ours_kwargs["is_causal"] = True
            self.allowed = (cols <= rows)[None, None]
        if mask == "window":
            self.ours_kwargs["window_size"] = (WINDOW - 1, 0)
            self.allowed = ((cols <= rows) & (cols > rows - WINDOW))[None, None]
        if "padding" in mask:  # every sequence keeps a random 25% to 100% of its keys (50% on average)
            lengths = (seqlen * (0.25 + 0.75 * torch.rand(self.batch, device=device))).long().clamp(min=1)
            padding = positions[None, :] >= lengths[:, None]
            self.ours_kwargs["key_padding_mask"] = padding
            keep = ~padding[:, None, None, :]
            self.allowed = keep if self.allowed is None else self.allowed & keep
        if mask in VERIFY_MASKS:  # the drafts see the cache and the drafts before them
            from torch.nn.attention.bias import causal_lower_right
            self.ours_kwargs["attn_mask"] = causal_lower_right(self.seqlen_q, seqlen)
            drafts = torch.arange(self.seqlen_q, device=device)[:, None]
            self.allowed = (cols <= drafts + (seqlen - self.seqlen_q))[None, None]
        if mask == "document":  # packed documents of random lengths: a block-diagonal boolean mask
            cuts = torch.sort(torch.randint(1, seqlen, (self.batch, max(1, seqlen // 1024)), device=device)).values
            document = (positions[None, :, None] >= cuts[:, None, :]).sum(-1)  # (B, L) document index
            self.allowed = (document[:, :, None] == document[:, None, :])[:, None]
            self.ours_kwargs["attn_mask"] = self.allowed
            self.document = document
        if self.allowed is not None:
            self.torch_kwargs["attn_mask"] = self.allowed
        if self.kv_heads != self.heads:
            self.ours_kwargs["enable_gqa"] = self.torch_kwargs["enable_gqa"] = True
        if mask == "causal":
            self.torch_kwargs = {"is_causal": True}  # torch's own fast causal path, not a dense mask
        if mask == "causal":  # the convention (../shared/GPU.md): half the square
            self.visible_pairs = self.batch * self.heads * seqlen * seqlen // 2
        elif self.allowed is None:
            self.visible_pairs = self.batch * self.heads * self.seqlen_q * seqlen
        else:
            self.visible_pairs = self.heads * int(self.allowed.expand(self.batch, 1, self.seqlen_q, seqlen).sum())

    def implementations(self) -> Dict[str, Callable]:
        return {"fasttransformer": self.ours, "torch-flash": self.sdpa("FLASH_ATTENTION"),
                "torch-efficient": self.sdpa("EFFICIENT_ATTENTION"), "torch-cudnn": self.sdpa("CUDNN_ATTENTION"),
                "torch-math": self.sdpa("MATH"), "flex": self.flex(), "naive": self.naive, "unsplit": self.unsplit,
                "unpacked": self.unpacked, "autotuned": self.autotuned}

    def ours(self):
        return scaled_dot_product_attention(self.q, self.k, self.v, backend=self.backend, dropout_p=self.dropout_p,
                                            **self.ours_kwargs)

    def autotuned(self):
        """``ours`` with autotuning on for this call (fasttransformer/ops/autotune.py): its first
        call of a case times the candidate configs and keeps the fastest, in the autotune file
        (FASTTRANSFORMER_AUTOTUNE_CACHE). "vs autotuned" below 1x: the tuned configs are faster
        than the table's."""
        from fasttransformer.ops import autotune
        if self.backend != "triton" or torch.device(self.device).type not in autotune.DEVICE_TYPES:
            raise NotImplementedError("autotune tunes the Triton kernels' calls on CUDA only")
        previous = autotune.ENABLED
        autotune.enable(True)
        try:
            return self.ours()
        finally:
            autotune.ENABLED = previous

    def unsplit(self):
        """Decode only: the Triton forward with one program per query block (num_splits=1), the
        baseline of the split keys that configs.forward_splits chooses for ``ours``."""
        if self.mask not in DECODE_MASKS or self.dropout_p or self.backend != "triton":
            raise NotImplementedError("the unsplit forward is timed for decode, without dropout, on the Triton "
                                      "backend only")
        from fasttransformer.kernels.attention_forward import attention_forward
        return attention_forward(self.q, self.k, self.v, causal_offset=self._draft_offset(), num_splits=1)[0]

    def unpacked(self):
        """decode-gqa and verify-gqa(7) only: the Triton forward with one program per query head
        (pack_gqa=False), the baseline of the packed GQA step that ``ours`` runs."""
        if self.mask not in GQA_MASKS or self.dropout_p or self.backend != "triton":
            raise NotImplementedError("the unpacked forward is timed for decode-gqa and verify-gqa(7), without "
                                      "dropout, on the Triton backend only")
        from fasttransformer.kernels.attention_forward import attention_forward
        return attention_forward(self.q, self.k, self.v, causal_offset=self._draft_offset(), pack_gqa=False)[0]

    def _draft_offset(self) -> Optional[int]:
        """The Triton launcher's causal_offset of a decoding case: verify-gqa's drafts are causal,
        lower right (L - their number); a decoding step's one query sees every key."""
        return self.seqlen - self.seqlen_q if self.mask in VERIFY_MASKS else None

    def sdpa(self, backend: str):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return F.scaled_dot_product_attention(self.q, self.k, self.v, dropout_p=self.dropout_p,
                                                      **self.torch_kwargs)
        return run

    def flex(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if self.dropout_p:
            def refuse():
                raise NotImplementedError("FlexAttention has no dropout")
            return refuse

        seqlen, window = self.seqlen, WINDOW
        padding = self.ours_kwargs.get("key_padding_mask")
        document = getattr(self, "document", None)
        mask_mods = {
            "none": None,
            "decode": None,
            "decode-gqa": None,
            **dict.fromkeys(VERIFY_MASKS, lambda b, h, q, k: k <= q + (seqlen - self.seqlen_q)),
            "causal": lambda b, h, q, k: k <= q,
            "window": lambda b, h, q, k: (k <= q) & (k > q - window),
            "padding": lambda b, h, q, k: ~padding[b, k],
            "causal+padding": lambda b, h, q, k: (k <= q) & ~padding[b, k],
            "document": lambda b, h, q, k: document[b, q] == document[b, k],
        }
        mask_mod = mask_mods[self.mask]
        block_mask = None
        if mask_mod is not None:  # built once, outside the timed region: "given the same mask"
            batch = None if self.mask in ("causal", "window") else self.batch
            block_mask = create_block_mask(mask_mod, batch, None, self.seqlen_q, seqlen, device=self.device)
        compiled = _compiled_flex_attention(flex_attention)
        gqa = self.kv_heads != self.heads
        return lambda: compiled(self.q, self.k, self.v, block_mask=block_mask, enable_gqa=gqa)

    def naive(self):
        group = self.heads // self.kv_heads
        k, v = self.k.repeat_interleave(group, 1), self.v.repeat_interleave(group, 1)
        scores = (self.q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        if self.allowed is not None:
            scores = scores.masked_fill(~self.allowed, float("-inf"))
        probabilities = torch.softmax(scores.float(), dim=-1).to(self.dtype)
        if self.dropout_p:  # no dropout launch in the dropout-free sweep
            probabilities = F.dropout(probabilities, self.dropout_p)
        return probabilities @ v

    def run(self, fn, mode: str):
        """One call of ``fn`` in ``mode``: forward (no autograd graph), forward + backward, or
        ``jvp``: the forward in forward-mode AD (dual Q, K and V, as torch.func.jvp runs it),
        returning the output's tangent."""
        if mode == "fwd":
            with torch.no_grad():
                return fn()
        if mode == "jvp":
            import torch.autograd.forward_ad as forward_ad
            if not hasattr(self, "tangents"):
                self.tangents = tuple(torch.randn_like(tensor, requires_grad=False) for tensor in (self.q, self.k,
                                                                                                  self.v))
            primals = self.q, self.k, self.v
            with torch.no_grad(), forward_ad.dual_level():
                self.q, self.k, self.v = (forward_ad.make_dual(primal.detach(), tangent)
                                          for primal, tangent in zip(primals, self.tangents))
                try:
                    return forward_ad.unpack_dual(fn()).tangent
                finally:
                    self.q, self.k, self.v = primals
        self.q.grad = self.k.grad = self.v.grad = None
        fn().backward(self.grad)


_FLEX = {}


def _compiled_flex_attention(flex_attention):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


SKIPPED_WITHOUT_GPU = ("no CUDA GPU: the Triton kernels run on the CPU only under the interpreter (for "
                       "correctness, not speed)")


def sweep(device: str, quick: bool = False, masks=None, head_dims=None, seqlens=None, modes=None,
          dtype=torch.bfloat16, progress=None, tokens=TOKENS, hidden=HIDDEN, implementations=DEFAULT_IMPLEMENTATIONS,
          dropout_p: float = 0.0, checkpoint=None, head_dim_v: Optional[int] = None) -> dict:
    """Every (mask, D, L, implementation, mode); the record holds a row per case and mode, and a
    "bwd" row (fwd+bwd time minus fwd time) when both were timed. Meant for CUDA (the CLI skips
    it elsewhere); on the CPU it runs too, for the tests, with small ``tokens``/``hidden``.
    ``dropout_p``: every implementation applies it (FlexAttention, which has none, is n/a).
    ``checkpoint(record)`` is called after each case with the record so far, marked
    ``"partial": "<done> of <total> cases"``: a run stopped midway (a deadline) keeps what it timed.
    ``head_dim_v``: the value's head dim in every case (default: each case's D)."""
    cuda = device == "cuda"
    masks = masks or (QUICK_MASKS if quick else MASKS)
    head_dims = head_dims or ((128,) if quick else (64, 128))
    seqlens = seqlens or ((1024, 8192) if quick else (512, 1024, 2048, 4096, 8192, 16384))
    modes = modes or ("fwd", "fwd+bwd", "jvp")
    record = {"benchmark": "attention", "environment": common.environment(device), "ceilings": common.ceilings(device),
              "tokens": tokens, "hidden": hidden, "dtype": str(dtype).replace("torch.", ""), "dropout_p": dropout_p,
              "results": []}
    peak = record["ceilings"]["matmul_tflops"]
    cases = [(mask, head_dim, seqlen) for mask in masks for head_dim in head_dims for seqlen in seqlens]
    for index, (mask, head_dim, seqlen) in enumerate(cases):
        case = Case(mask, seqlen, head_dim, device, dtype, tokens, hidden, dropout_p, head_dim_v=head_dim_v)
        by_mode = {}
        for mode in modes:
            if mask in DECODE_MASKS and mode != "fwd":  # a decoding step has no backward
                continue
            row = _row(case, mode)
            for name, fn in case.implementations().items():
                if name not in implementations:
                    continue
                try:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    row["times_ms"][name] = common.time_ms(lambda: case.run(fn, mode), device)
                    if cuda:
                        row["peak_mib"][name] = torch.cuda.max_memory_allocated() / 2**20
                except Exception as error:  # noqa: BLE001  (every failure is a reported "n/a")
                    row["not_run"][name] = _reason(error)
                    if cuda:
                        torch.cuda.empty_cache()
            by_mode[mode] = row
        if {"fwd", "fwd+bwd"} <= by_mode.keys():  # the backward alone: the difference of the two
            row = by_mode["bwd"] = _row(case, "bwd")
            forward, both = by_mode["fwd"], by_mode["fwd+bwd"]
            row["times_ms"] = {name: both["times_ms"][name] - ms for name, ms in forward["times_ms"].items()
                               if name in both["times_ms"]}
            row["not_run"] = {**forward["not_run"], **both["not_run"]}
        for row in by_mode.values():
            ours = row["times_ms"].get("fasttransformer")
            row["tflops"] = {name: row["flops"] / ms / 1e9 for name, ms in row["times_ms"].items()}
            row["fraction_of_matmul"] = {name: value / peak for name, value in row["tflops"].items()}
            row["gbps"] = {name: row["bytes"] / ms / 1e6 for name, ms in row["times_ms"].items()}
            row["fraction_of_copy"] = {name: value / record["ceilings"]["copy_gbps"]
                                       for name, value in row["gbps"].items()}
            row["speedup"] = {name: ms / ours for name, ms in row["times_ms"].items()} if ours else {}
            record["results"].append(row)
        if checkpoint and index + 1 < len(cases):
            checkpoint({**record, "partial": f"{index + 1} of {len(cases)} cases"})
        if progress:
            progress(index + 1, len(cases), row)
        del case
        if cuda:
            torch.cuda.empty_cache()
    return record


def _row(case: Case, mode: str) -> dict:
    seqlen, seqlen_q = case.seqlen, case.seqlen_q
    return {"mask": case.mask, "head_dim": case.head_dim, "head_dim_v": case.head_dim_v, "seqlen": seqlen,
            "seqlen_q": seqlen_q, "batch": case.batch, "heads": case.heads, "kv_heads": case.kv_heads, "mode": mode,
            "visible_fraction": case.visible_pairs / (case.batch * case.heads * seqlen_q * seqlen),
            "flops": flops(case.visible_pairs, case.head_dim, mode, case.head_dim_v),
            "bytes": bytes_moved(case.batch, case.heads, seqlen, case.head_dim, case.q.element_size(), mode, seqlen_q,
                                 case.kv_heads, case.head_dim_v),
            "times_ms": {}, "peak_mib": {}, "not_run": {}}


def head_dims(row: dict) -> str:
    """A row's head dim as tables and plots show it: "D", or "D/Dv" when the value's differs
    (records before Dv was recorded have no head_dim_v)."""
    head_dim_v = row.get("head_dim_v", row["head_dim"])
    return str(row["head_dim"]) if head_dim_v == row["head_dim"] else f"{row['head_dim']}/{head_dim_v}"


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def markdown(record: dict) -> str:
    if record.get("skipped"):
        return f"# Attention benchmark\n\nSkipped: {record['skipped']}.\n"
    env, ceil = record["environment"], record["ceilings"]
    lines = [f"# Attention benchmark: {env['device']}",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, driver "
             f"{env.get('driver')}, commit {env['commit']}. Command: `{env['command']}`",
             f"B*L = {record['tokens']} tokens, hidden {record['hidden']}, {record['dtype']}"
             + (f", dropout {record['dropout_p']}" if record.get("dropout_p") else "") + ". Measured bf16 matmul: "
             f"{ceil['matmul_tflops']:.0f} TFLOP/s. D/Dv: a value head dim unlike the query's. TFLOP/s count "
             "visible (query, key) pairs only; speedup = "
             "baseline time / fasttransformer time. decode: one query per sequence, L keys (decode-gqa: "
             f"{GQA_GROUP} query heads per key head; verify-gqa: {SPECULATIVE_QUERIES} queries per sequence, "
             f"causal lower right, as decode-gqa's heads; verify-gqa7: with {QWEN2_GROUP} query heads per key "
             "head); GB/s of K, V and Q "
             f"read and O written (measured copy: {ceil['copy_gbps']:.0f} GB/s).", ""]
    if record.get("partial"):
        lines[-1:-1] = ["", f"Partial record: the run stopped after {record['partial']}."]
    timed = {name for row in record["results"] for name in (*row["times_ms"], *row["not_run"])}
    baselines = [name for name in IMPLEMENTATIONS  # "autotuned" where it was asked for (--autotune)
                 if name != "fasttransformer" and (name in DEFAULT_IMPLEMENTATIONS or name in timed)]
    lines.append("| mask | D | L | mode | visible | fasttransformer TFLOP/s (% of matmul) | "
                 + " | ".join(f"vs {name}" for name in baselines) + " |")
    lines.append("|" + "---|" * (6 + len(baselines)))
    for row in record["results"]:
        ours = row["tflops"].get("fasttransformer")
        if ours and row["mask"] in DECODE_MASKS:  # bound by the bytes read
            figure = (f"{row['gbps']['fasttransformer']:.0f} GB/s "
                      f"({row['fraction_of_copy']['fasttransformer']:.0%} of copy)")
        elif ours:
            figure = f"{ours:.0f} ({row['fraction_of_matmul']['fasttransformer']:.0%})"
        else:
            figure = f"n/a: {row['not_run'].get('fasttransformer', '')}"
        cells = [row["mask"], head_dims(row), str(row["seqlen"]), row["mode"], f"{row['visible_fraction']:.0%}",
                 figure]
        for name in baselines:
            if name in row["speedup"]:
                cells.append(f"{row['speedup'][name]:.2f}x")
            elif name in row["times_ms"]:
                cells.append(f"{row['tflops'][name]:.0f} TFLOP/s")
            else:
                cells.append("n/a")
        lines.append("| " + " | ".join(cells) + " |")
    reasons = {(name, reason) for row in record["results"] for name, reason in row["not_run"].items()}
    if reasons:
        lines += ["", "Not run (n/a):", ""] + [f"- {name}: {reason}" for name, reason in sorted(reasons)]
    return "\n".join(lines) + "\n"


def plot(record: dict, path) -> bool:
    """TFLOP/s (decode: GB/s) against L, one panel per (mask, D, mode), one line per implementation. False when
    matplotlib is missing or there is nothing to plot."""
    if not record["results"]:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(row["mask"], head_dims(row), row["mode"]) for row in record["results"]})
    columns = min(4, len(panels))
    rows_count = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows_count, columns, figsize=(4.2 * columns, 3.2 * rows_count), squeeze=False)
    for axis, (mask, head_dim, mode) in zip(axes.flat, panels):
        rows = sorted((r for r in record["results"] if (r["mask"], head_dims(r), r["mode"]) == (mask, head_dim, mode)),
                      key=lambda r: r["seqlen"])
        for name in IMPLEMENTATIONS:
            metric = "gbps" if mask in DECODE_MASKS else "tflops"
            points = [(r["seqlen"], r[metric][name]) for r in rows if name in r.get(metric, {})]
            if points:
                axis.plot(*zip(*points), marker="o", label=name, linewidth=2.5 if name == "fasttransformer" else 1)
        axis.set_xscale("log", base=2)
        axis.set_title(f"{mask}, D={head_dim}, {mode}", fontsize=9)
        axis.set_xlabel("sequence length")
        axis.set_ylabel("GB/s" if mask in DECODE_MASKS else "TFLOP/s")
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
