"""fasttransformer's layers and Seq2SeqTransformer against torch.nn, same weights, same inputs.

Baseline: torch.nn.Transformer with nn.Embedding and a sinusoidal-encoding buffer
(``fasttransformer.demo.TorchSeq2Seq``, the same state_dict), generation by re-running the decoder
on the whole prefix at every step (torch.nn has no cache). Subjects:
  * layer: one encoder layer and one decoder layer, forward + backward, ~20% key padding;
  * train: a full training step (forward, cross-entropy, backward, AdamW), tokens/s counted
    without padding, peak memory on CUDA;
  * generate: greedy decoding of a fixed number of tokens (the EOS row of the untied output
    projection is zeroed so no sequence stops early, in both models).
CUDA: Transformer-base (d 512, 8 heads, 6+6 layers, FFN 2048, vocab 32k, length 512, batch 64)
under bf16 autocast. CPU: a smaller model (below) in float32.

    python -m fasttransformer bench model [--out DIR]            # JSON + Markdown + plot
    pytest benchmarks/bench_model.py --benchmark-json=FILE       # pytest-benchmark
"""
from __future__ import annotations

import contextlib

import torch

import fasttransformer as ft
from fasttransformer.bench import common
from fasttransformer.demo import TorchSeq2Seq

CONFIGS = {
    "cuda": dict(vocab=32768, d_model=512, nhead=8, layers=6, dim_feedforward=2048, seqlen=512, batch=64,
                 new_tokens=128),
    "cpu": dict(vocab=8192, d_model=256, nhead=4, layers=2, dim_feedforward=1024, seqlen=128, batch=16,
                new_tokens=32),
}
PAD, BOS, EOS = 0, 1, 2
PADDING = 0.2


class Case:
    def __init__(self, device, config):
        self.device, self.config = device, config
        model_config = dict(d_model=config["d_model"], nhead=config["nhead"], num_encoder_layers=config["layers"],
                            num_decoder_layers=config["layers"], dim_feedforward=config["dim_feedforward"],
                            dropout=0.1, pad_id=PAD, tie_output=False)
        vocab = config["vocab"]
        self.models = {"fasttransformer": ft.models.Seq2SeqTransformer(vocab, vocab, **model_config),
                       "torch.nn": TorchSeq2Seq(vocab, vocab, **model_config)}
        self.models["torch.nn"].load_state_dict(self.models["fasttransformer"].state_dict(), strict=True)
        with torch.no_grad():
            self.models["fasttransformer"].output_projection.weight[EOS] = 0
            self.models["torch.nn"].output_projection.weight[EOS] = 0
        for model in self.models.values():
            model.to(device)
        self.optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in self.models.items()}
        self.batches = [self.make_batch() for _ in range(3)]  # rotated: no run reuses the last one's inputs
        self.turn = 0

    def make_batch(self):
        batch, seqlen, vocab = self.config["batch"], self.config["seqlen"], self.config["vocab"]
        ids = torch.randint(3, vocab, (2, batch, seqlen + 1))
        lengths = (seqlen * (1 - 2 * PADDING * torch.rand(2, batch))).long().clamp(min=2)  # ~20% padding on average
        ids[torch.arange(seqlen + 1) >= lengths[..., None]] = PAD
        src, tgt = ids[0, :, :seqlen].to(self.device), ids[1].to(self.device)
        tgt[:, 0] = BOS
        return src, tgt[:, :-1], tgt[:, 1:]

    def next_batch(self):
        self.turn = (self.turn + 1) % len(self.batches)
        return self.batches[self.turn]

    def tokens(self):
        src, _, tgt_out = self.batches[0]
        return int((src != PAD).sum() + (tgt_out != PAD).sum())

    def autocast(self):
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, name):
        model, optimizer = self.models[name], self.optimizers[name]
        model.train()
        src, tgt_in, tgt_out = self.next_batch()
        with self.autocast():
            logits = model(src, tgt_in)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def generate(self, name):
        model = self.models[name].eval()
        src = self.next_batch()[0]
        with self.autocast():
            out = model.generate(src, self.config["new_tokens"], BOS, EOS)
        assert out.shape[1] == self.config["new_tokens"], "a sequence stopped early"

    def layer_step(self, name, kind):
        """One encoder (or decoder) layer of each model, forward + backward."""
        model = self.models[name].train()
        layers = model.transformer.encoder.layers if kind == "encoder" else model.transformer.decoder.layers
        src, tgt_in, _ = self.next_batch()
        x = torch.randn(*src.shape, self.config["d_model"], device=self.device, requires_grad=True)
        padding = src == PAD
        with self.autocast():
            if kind == "encoder":
                out = layers[0](x, src_key_padding_mask=padding)
            else:
                causal = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=self.device,
                                                                              dtype=torch.bool)
                out = layers[0](x, x.detach(), tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=padding,
                                memory_key_padding_mask=padding)
        out.float().square().mean().backward()


def measure(fn, device):
    """(median ms, peak MiB on CUDA or None)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return common.time_ms(fn, device), peak
    return common.time_ms(fn, device), None


def sweep(device: str, quick: bool = False) -> dict:
    """``quick``: half the batch, length and generated tokens, one timing round."""
    config = dict(CONFIGS[device])
    if quick:
        config.update(batch=config["batch"] // 2, seqlen=config["seqlen"] // 2, new_tokens=config["new_tokens"] // 2)
    record = {"benchmark": "model", "environment": common.environment(device), "config": config,
              "dtype": "bf16 autocast" if device == "cuda" else "float32", "results": []}
    case = Case(device, config)
    subjects = [("encoder layer fwd+bwd", lambda name: case.layer_step(name, "encoder")),
                ("decoder layer fwd+bwd", lambda name: case.layer_step(name, "decoder")),
                ("training step", case.train_step),
                (f"generate {config['new_tokens']} tokens", case.generate)]
    tokens = case.tokens()
    for subject, run in subjects:
        row = {"subject": subject}
        # interleaved rounds, the best kept: CPU timings are noisy
        for _ in range(2 if device == "cpu" and not quick else 1):
            for name in ("fasttransformer", "torch.nn"):
                ms, row[f"peak_mib_{name}"] = measure(lambda: run(name), device)
                row[f"ms_{name}"] = min(ms, row.get(f"ms_{name}", ms))
        row["speedup"] = row["ms_torch.nn"] / row["ms_fasttransformer"]
        if subject == "training step":
            row["tokens_per_s_fasttransformer"] = tokens / row["ms_fasttransformer"] * 1e3
            row["tokens_per_s_torch.nn"] = tokens / row["ms_torch.nn"] * 1e3
        record["results"].append(row)
        print(markdown_row(row), flush=True)
    return record


HEADER = ("| subject | fasttransformer ms | torch.nn ms | speedup | peak MiB (ours / torch.nn) |\n"
          "|---|---|---|---|---|")


def markdown_row(row):
    peak = (f"{row['peak_mib_fasttransformer']:.0f} / {row['peak_mib_torch.nn']:.0f}"
            if row["peak_mib_fasttransformer"] is not None else "n/a (CPU)")
    return (f"| {row['subject']} | {row['ms_fasttransformer']:.2f} | {row['ms_torch.nn']:.2f} | "
            f"{row['speedup']:.2f}x | {peak} |")


def markdown(record):
    env, config = record["environment"], record["config"]
    lines = [f"# Model benchmark: {env['device']}",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
             f"{env['cpu_threads']} CPU threads. Command: `{env['command']}`",
             f"Seq2SeqTransformer vs the same model from torch.nn parts ({record['dtype']}): d_model "
             f"{config['d_model']}, {config['nhead']} heads, {config['layers']}+{config['layers']} layers, FFN "
             f"{config['dim_feedforward']}, vocab {config['vocab']}, length {config['seqlen']}, "
             f"batch {config['batch']}, ~{PADDING:.0%} padding.", "", HEADER]
    lines += [markdown_row(row) for row in record["results"]]
    for row in record["results"]:
        if "tokens_per_s_fasttransformer" in row:
            lines += ["", f"Training tokens/s (without padding): fasttransformer "
                          f"{row['tokens_per_s_fasttransformer']:,.0f}, torch.nn {row['tokens_per_s_torch.nn']:,.0f}."]
    return "\n".join(lines) + "\n"
