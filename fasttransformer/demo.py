"""``python -m fasttransformer demo``: train a small Seq2SeqTransformer on a synthetic task that
needs attention, then report held-out exact-match accuracy and a few decoded examples.

Tasks (digit sequences of random length, padded in the batch): ``reverse`` (output the digits
backwards) and ``sort`` (output them in ascending order). ``--compare`` trains the same model
built from torch.nn (``nn.Transformer``, ``nn.Embedding`` and a sinusoidal encoding), from the same
initial weights and on the same batches, and prints both.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from fasttransformer._cli import device_type, resolve_device
from fasttransformer.models import Seq2SeqTransformer
from fasttransformer.reference import sinusoidal_positions

PAD, BOS, EOS, FIRST_DIGIT = 0, 1, 2, 3
VOCAB = FIRST_DIGIT + 10
TASKS = {
    "reverse": lambda digits: digits.flip(0),
    "sort": lambda digits: digits.sort().values,
}


def make_batch(task: str, batch: int, min_len: int, max_len: int, generator: torch.Generator, device):
    """``(src, tgt_in, tgt_out)``: padded ids; ``tgt_in`` starts with BOS, ``tgt_out`` ends with EOS."""
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    src = torch.full((batch, max_len), PAD, dtype=torch.long)
    tgt = torch.full((batch, max_len + 2), PAD, dtype=torch.long)
    tgt[:, 0] = BOS
    for row, length in enumerate(lengths.tolist()):
        digits = torch.randint(FIRST_DIGIT, VOCAB, (length,), generator=generator)
        src[row, :length] = digits
        tgt[row, 1:length + 1] = TASKS[task](digits)
        tgt[row, length + 1] = EOS
    width = int(lengths.max())
    return src[:, :width].to(device), tgt[:, :width + 1].to(device), tgt[:, 1:width + 2].to(device)


class SinusoidalEmbedding(torch.nn.Embedding):
    """``torch.nn.Embedding`` scaled by sqrt(d) plus a sinusoidal-encoding buffer, then dropout:
    the unfused chain a torch.nn user writes."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx, dropout, max_len=4096):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.register_buffer("encoding", sinusoidal_positions(torch.arange(max_len), embedding_dim),
                             persistent=False)
        self.scale, self.dropout = math.sqrt(embedding_dim), torch.nn.Dropout(dropout)

    def forward(self, ids, start_pos: int = 0):
        encoding = self.encoding[start_pos:start_pos + ids.shape[1]].to(self.weight.dtype)
        return self.dropout(super().forward(ids) * self.scale + encoding)


class TorchSeq2Seq(torch.nn.Module):
    """The baseline: Seq2SeqTransformer's architecture from torch.nn parts, with the same
    ``state_dict`` keys, so it can start from the same weights. ``generate`` re-runs the whole
    decoder at every step, as torch.nn.Transformer offers no cache."""

    def __init__(self, src_vocab_size, tgt_vocab_size, d_model=512, nhead=8, num_encoder_layers=6,
                 num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, pad_id=0, *, tie_output=True,
                 norm_first=False):
        super().__init__()
        self.pad_id = pad_id
        self.src_embed = SinusoidalEmbedding(src_vocab_size, d_model, pad_id, dropout)
        self.tgt_embed = SinusoidalEmbedding(tgt_vocab_size, d_model, pad_id, dropout)
        self.transformer = torch.nn.Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers,
                                                dim_feedforward, dropout, batch_first=True, norm_first=norm_first)
        self.output_projection = torch.nn.Linear(d_model, tgt_vocab_size, bias=False)
        if tie_output:
            self.output_projection.weight = self.tgt_embed.weight

    def forward(self, src_ids, tgt_ids):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt_ids.shape[1], device=tgt_ids.device,
                                                                      dtype=torch.bool)
        tgt_padding = tgt_ids == self.pad_id
        tgt_padding[:, 0] = False  # the start token, which may be pad_id, is never padding
        out = self.transformer(self.src_embed(src_ids), self.tgt_embed(tgt_ids), tgt_mask=causal,
                               src_key_padding_mask=src_ids == self.pad_id,
                               tgt_key_padding_mask=tgt_padding,
                               memory_key_padding_mask=src_ids == self.pad_id, tgt_is_causal=True)
        return self.output_projection(out)

    @torch.no_grad()
    def generate(self, src_ids, max_new_tokens, bos_id, eos_id):
        tokens = torch.full((src_ids.shape[0], 1), bos_id, dtype=src_ids.dtype, device=src_ids.device)
        finished = torch.zeros(src_ids.shape[0], dtype=torch.bool, device=src_ids.device)
        for _ in range(max_new_tokens):
            next_token = self(src_ids, tokens)[:, -1].argmax(-1).to(tokens.dtype)
            tokens = torch.cat([tokens, next_token.masked_fill(finished, self.pad_id)[:, None]], dim=1)
            finished |= next_token == eos_id
            if bool(finished.all()):
                break
        return tokens[:, 1:]


@dataclass
class Result:
    name: str
    accuracy: float
    seconds: float
    tokens_per_second: float
    final_loss: float
    examples: list


def exact_match(model, src, expected, max_new_tokens) -> tuple:
    """Fraction of sequences whose generated tokens, up to and including EOS, equal ``expected``
    (``tgt_out``: the answer, EOS, padding); and the generated tokens."""
    model.eval()
    generated = model.generate(src, max_new_tokens, BOS, EOS)
    width = expected.shape[1]
    generated = torch.nn.functional.pad(generated, (0, max(0, width - generated.shape[1])), value=PAD)[:, :width]
    correct = (generated == expected).all(dim=1)
    return correct.float().mean().item(), generated


def train(model, name, args, device, show_progress=True) -> Result:
    """AdamW with warm-up and linear decay; one fresh batch per step (the same stream for every
    model trained with the same seed)."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    decay = max(1, args.steps - warmup)  # steps of the linear decay (one step: none)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (args.steps - step) / decay)))
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=PAD)
    progress = _progress(args.steps, name, show_progress)
    tokens, loss_value, start = 0, float("nan"), time.perf_counter()
    model.train()
    for step in range(args.steps):
        src, tgt_in, tgt_out = make_batch(args.task, args.batch_size, args.min_len, args.max_len, generator, device)
        logits = model(src, tgt_in)
        loss = loss_fn(logits.flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        tokens += int((src != PAD).sum()) + int((tgt_out != PAD).sum())
        if step % 20 == 0 or step == args.steps - 1:
            loss_value = loss.item()
            progress(step + 1, loss_value, tokens / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    progress(None, loss_value, tokens / seconds)

    test = torch.Generator().manual_seed(args.seed + 2)  # held out: a stream training never draws
    src, _, tgt_out = make_batch(args.task, args.eval_size, args.min_len, args.max_len, test, device)
    accuracy, generated = exact_match(model, src, tgt_out, args.max_len + 1)
    examples = [(_digits(src[i]), _digits(generated[i])) for i in range(min(args.examples, len(src)))]
    return Result(name, accuracy, seconds, tokens / seconds, loss_value, examples)


def _digits(ids) -> str:
    return "".join(str(t - FIRST_DIGIT) if t >= FIRST_DIGIT else {EOS: "", PAD: ""}.get(t, "?")
                   for t in ids.tolist()) or "(empty)"


def _progress(total, name, enabled):
    """A tqdm bar (loss, tokens/s) when tqdm is installed and enabled; else a line every 20%."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=total, desc=name, unit="step", dynamic_ncols=True) if enabled and tqdm else None
    last = [0]

    def update(step, loss, tokens_per_second):
        if step is None:
            if bar is not None:
                bar.close()
            return
        if bar is not None:
            bar.update(step - last[0])
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")
        elif enabled and (step * 5 // total > last[0] * 5 // total or step == total):
            print(f"{name}: step {step}/{total}  loss {loss:.3f}  {tokens_per_second:,.0f} tokens/s", flush=True)
        last[0] = step

    return update


def build_parser(parser=None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fasttransformer demo", description=__doc__)
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--task", choices=sorted(TASKS), default="reverse", help="what to learn (default: reverse)")
    parser.add_argument("--steps", type=int, default=800, help="training steps (default: 800)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per step (default: 64)")
    parser.add_argument("--min-len", type=int, default=1, help="shortest sequence (default: 1)")
    parser.add_argument("--max-len", type=int, default=16, help="longest sequence (default: 16)")
    parser.add_argument("--d-model", type=int, default=64, help="model width (default: 64)")
    parser.add_argument("--nhead", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each (default: 2)")
    parser.add_argument("--dim-feedforward", type=int, default=256, help="feed-forward width (default: 256)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout (default: 0; the data is endless)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out sequences (default: 1000)")
    parser.add_argument("--examples", type=int, default=5, help="decoded examples to print (default: 5)")
    parser.add_argument("--device", type=device_type, default=None,
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default: 0)")
    parser.add_argument("--compare", action="store_true",
                        help="also train torch.nn.Transformer from the same weights and print both")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args) -> list:
    for name in ("steps", "batch_size", "min_len", "d_model", "nhead", "layers", "dim_feedforward", "eval_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.examples < 0:
        raise SystemExit(f"--examples must be >= 0, got {args.examples}")
    if not 0.0 < args.lr < math.inf:
        raise SystemExit(f"--lr must be a positive number, got {args.lr}")
    if args.max_len < args.min_len:
        raise SystemExit(f"--max-len ({args.max_len}) must be >= --min-len ({args.min_len})")
    if args.d_model % args.nhead or args.d_model % 2:
        raise SystemExit(f"--d-model ({args.d_model}) must be even and a multiple of --nhead ({args.nhead})")
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"--dropout must be in [0, 1), got {args.dropout}")
    device = resolve_device(args.device)
    config = dict(d_model=args.d_model, nhead=args.nhead, num_encoder_layers=args.layers,
                  num_decoder_layers=args.layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
                  pad_id=PAD)
    torch.manual_seed(args.seed)
    model = Seq2SeqTransformer(VOCAB, VOCAB, **config).to(device)
    print(f"task {args.task!r}: {args.steps} steps of {args.batch_size} sequences of {args.min_len}-{args.max_len} "
          f"digits on {device}; {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    models = [("fasttransformer", model)]
    if args.compare:
        baseline = TorchSeq2Seq(VOCAB, VOCAB, **config).to(device)
        baseline.load_state_dict(model.state_dict(), strict=True)
        models.append(("torch.nn", baseline))
    results = [train(m, name, args, device, show_progress=not args.no_progress) for name, m in models]
    for result in results:
        print(f"\n{result.name}: exact match {result.accuracy:.1%} on {args.eval_size} held-out sequences; "
              f"trained in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s), "
              f"final loss {result.final_loss:.4f}")
        for source, output in result.examples:
            print(f"  {source:>{args.max_len}} -> {output}")
    return results
