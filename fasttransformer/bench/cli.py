"""``python -m fasttransformer bench [attention|embedding|model|all]``: run the sweeps on this
machine and write, per subject, ``<subject>.json`` (environment and every figure),
``<subject>.md`` (the table, also printed) and, for attention, ``attention.png``.

Without a GPU it runs what is meaningful on the CPU (the embedding's CPU kernels against torch's
chain, the layers and model on the CPU) and says that the GPU subjects were skipped.
"""
from __future__ import annotations

import argparse
import datetime

import torch

from fasttransformer._cli import output_folder

SUBJECTS = ("attention", "embedding", "model")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser(parser=None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fasttransformer bench")
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("subject", nargs="?", default="all", choices=SUBJECTS + ("all",),
                        help="what to benchmark (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few points only (about a minute per subject)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: bench-results/<date>-<gpu or cpu>)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    attention = parser.add_argument_group("attention")
    attention.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    attention.add_argument("--head-dim", type=int, action="append", help="head dim (repeatable; default 64 and 128)")
    attention.add_argument("--value-head-dim", type=int, default=None,
                           help="the value's head dim, when it differs from --head-dim (DeepSeek's MLA: --head-dim "
                           "192 --value-head-dim 128)")
    attention.add_argument("--seq-len", type=int, action="append",
                           help="sequence length (repeatable; default 512..16k)")
    attention.add_argument("--mask", action="append", help="mask kind (repeatable): none, causal, padding, document, "
                           "window, causal+padding, decode (one query per sequence, forward only), "
                           "decode-gqa (the same, 4 query heads per key head), verify-gqa (4 queries per "
                           "sequence, causal lower right, as decode-gqa's heads: speculative decoding), "
                           "verify-gqa7 (the same with 7 query heads per key head, as Qwen2's)")
    attention.add_argument("--dropout", type=float, default=0.0,
                           help="dropout_p for every implementation that has dropout (default 0)")
    attention.add_argument("--autotune", action="store_true",
                           help="also time the kernels with FASTTRANSFORMER_AUTOTUNE on (the \"autotuned\" column: "
                           "below 1x, the tuned configs beat the table's); each case's first call tunes it, "
                           "tens of seconds, kept in the autotune file")
    modes = attention.add_mutually_exclusive_group()
    modes.add_argument("--fwd", action="store_true", help="forward only (default: forward, forward + backward and "
                       "forward mode)")
    modes.add_argument("--bwd", action="store_true", help="forward + backward only")
    modes.add_argument("--jvp", action="store_true",
                       help="forward mode only: the output and its tangent (torch.func.jvp's work; against torch's "
                       "math backend, the one of torch's SDPA kernels with a forward-mode derivative)")
    return parser


def run(args) -> dict:
    """Runs the chosen subjects; returns {subject: record}."""
    from fasttransformer.bench import attention, common, embedding, model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    for name, values in (("--head-dim", args.head_dim), ("--seq-len", args.seq_len)):
        if values and any(v < 1 for v in values):
            raise SystemExit(f"{name} must be >= 1, got {values}")
    if args.head_dim and any(d > 256 for d in args.head_dim):
        raise SystemExit(f"--head-dim must be <= 256 (the kernels' limit), got {args.head_dim}")
    if args.value_head_dim is not None and not 1 <= args.value_head_dim <= 256:
        raise SystemExit(f"--value-head-dim must be in [1, 256] (the kernels' limit), got {args.value_head_dim}")
    if args.mask and (unknown := sorted(set(args.mask) - set(attention.MASKS))):
        raise SystemExit(f"--mask {unknown[0]!r} is not one of {', '.join(attention.MASKS)}")
    if (args.bwd or args.jvp) and args.mask and set(args.mask) <= set(attention.DECODE_MASKS):
        raise SystemExit(f"{'--bwd' if args.bwd else '--jvp'} with --mask {' '.join(sorted(set(args.mask)))} times "
                         "nothing: a decoding step is timed forward only")
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"--dropout must be in [0, 1), got {args.dropout}")
    label = torch.cuda.get_device_name().split()[-1].lower() if device == "cuda" else "cpu"
    out = output_folder(args.out or f"bench-results/{datetime.date.today()}-{label}", "--out")  # before the sweeps
    subjects = SUBJECTS if args.subject == "all" else (args.subject,)
    modules = {"attention": attention, "embedding": embedding, "model": model}
    records = {}
    for subject in subjects:
        print(f"== {subject} on {device}", flush=True)
        if subject == "attention" and device != "cuda":
            record = {"benchmark": "attention", "skipped": attention.SKIPPED_WITHOUT_GPU, "results": []}
        elif subject == "attention":
            one_mode = ("fwd",) if args.fwd else ("fwd+bwd",) if args.bwd else ("jvp",) if args.jvp else None
            record = attention.sweep(device, args.quick, masks=args.mask, head_dims=args.head_dim,
                                     seqlens=args.seq_len, modes=one_mode, dtype=DTYPES[args.dtype],
                                     progress=_progress(),
                                     dropout_p=args.dropout, head_dim_v=args.value_head_dim,
                                     implementations=attention.DEFAULT_IMPLEMENTATIONS + (
                                         ("autotuned",) if args.autotune else ()),
                                     checkpoint=lambda partial: common.write_results(
                                         str(out), "attention", partial, attention.markdown(partial)))
        else:
            record = modules[subject].sweep(device, args.quick)
        text = modules[subject].markdown(record)
        common.write_results(str(out), subject, record, text)
        written = [f"{subject}.json", f"{subject}.md"]
        if subject == "attention" and attention.plot(record, out / "attention.png"):
            written.append("attention.png")
        print(text)
        print(f"wrote {', '.join(str(out / name) for name in written)}", flush=True)
        records[subject] = record
    if device == "cpu":
        print("GPU subjects skipped (no CUDA device): the attention kernels and the GPU sweeps of the embedding "
              "and the model need one.")
    return records


def _progress():
    """tqdm over the attention cases when tqdm is installed, else a line per case."""
    from fasttransformer.bench.attention import head_dims
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    state = {}

    def update(done, total, row):
        if tqdm is None:
            print(f"[{done}/{total}] {row['mask']} D={head_dims(row)} L={row['seqlen']} {row['mode']}", flush=True)
            return
        bar = state.setdefault("bar", tqdm(total=total, unit="case"))
        bar.set_postfix_str(f"{row['mask']} D={head_dims(row)} L={row['seqlen']}")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
