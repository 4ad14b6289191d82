"""Seq2SeqTransformer against the same model built from torch.nn parts, KV-cache generation
against full recomputation, and the demo end to end."""
import pytest
import torch

from conftest import DEVICES
from fasttransformer import demo
from fasttransformer.__main__ import main
from fasttransformer.models import Seq2SeqTransformer

CONFIG = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48, dropout=0.0)
VOCAB_SRC, VOCAB_TGT, PAD = 19, 23, 0


def padded_ids(batch, length, vocab, generator=None):
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    for row in range(batch):
        ids[row, torch.randint(1, length + 1, (), generator=generator):] = PAD
    return ids


@pytest.mark.parametrize("tie_output", [True, False], ids=["tied", "untied"])
def test_seq2seq_matches_torch_nn_model(tie_output):
    """Same weights, dropout off: the logits and every gradient equal torch.nn's (float64)."""
    ours = Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, **CONFIG, pad_id=PAD, tie_output=tie_output).double()
    baseline = demo.TorchSeq2Seq(VOCAB_SRC, VOCAB_TGT, **CONFIG, pad_id=PAD, tie_output=tie_output).double()
    baseline.load_state_dict(ours.state_dict(), strict=True)
    src, tgt = padded_ids(3, 11, VOCAB_SRC), padded_ids(3, 8, VOCAB_TGT)
    tgt[:, 0] = 1
    grad = torch.randn(3, 8, VOCAB_TGT, dtype=torch.float64)
    logits = []
    for model in (ours, baseline):
        out = model(src, tgt)
        (out * grad).sum().backward()
        logits.append(out)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-10, rtol=1e-10)
    baseline_params = dict(baseline.named_parameters())
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, baseline_params[name].grad, atol=1e-10, rtol=1e-10, msg=name)
    assert (ours.output_projection.weight is ours.tgt_embed.weight) == tie_output


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's CPU SDPA under vmap
@pytest.mark.parametrize("device", DEVICES)
def test_seq2seq_under_torch_func_grad_and_per_example_gradients(device):
    """Functional training (torch.func.functional_call + grad) gives autograd's gradients, and
    vmap(grad) each example's: the embedding, attention (the Triton kernels on CUDA) and the
    layers all compose with torch.func."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(30, 31, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=64, dropout=0.0).to(device)
    src, tgt = torch.randint(1, 30, (2, 9), device=device), torch.randint(1, 31, (2, 7), device=device)
    src[1, 6:] = 0  # padding
    params = {name: param.detach() for name, param in model.named_parameters()}

    def loss(params, src, tgt):
        return torch.func.functional_call(model, params, (src, tgt)).logsumexp(-1).sum()

    grads = torch.func.grad(loss)(params, src, tgt)
    per_example = torch.func.vmap(torch.func.grad(loss), (None, 0, 0))(params, src[:, None], tgt[:, None])
    for index in (None, 0, 1):
        model.zero_grad()
        rows = slice(None) if index is None else slice(index, index + 1)
        loss(dict(model.named_parameters()), src[rows], tgt[rows]).backward()
        for name, param in model.named_parameters():
            got = grads[name] if index is None else per_example[name][index]
            torch.testing.assert_close(got, param.grad, msg=lambda text: f"{name}, example {index}: {text}")


def test_seq2seq_compiled_training_on_variable_lengths_compiles_twice(monkeypatch):
    """A training step under torch.compile on batches of changing lengths, with the Triton
    kernels (the interpreter here, the GPU under make gpu-check): torch compiles it once, and once
    more with symbolic sizes when the lengths change; nothing in the model (padding masks from
    the ids, the causal mask, the layers) specialises on a length, so no later batch compiles
    again. The loss and every gradient match the eager model's."""
    import functools

    import fasttransformer as ft
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    monkeypatch.setattr(ft.nn.attention, "scaled_dot_product_attention",
                        functools.partial(ft.ops.scaled_dot_product_attention, backend="triton"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                               dim_feedforward=48, dropout=0.0, pad_id=PAD).to(device)

    def step(src, tgt):
        return model(src, tgt).float().logsumexp(-1).mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    for source_length, target_length in ((7, 5), (11, 9), (13, 6), (17, 10)):
        src = padded_ids(3, source_length, VOCAB_SRC).to(device)
        tgt = padded_ids(3, target_length, VOCAB_TGT).to(device)
        tgt[:, 0] = 1
        results = []
        for run in (compiled, step):
            model.zero_grad()
            loss = run(src, tgt)
            loss.backward()
            results.append([loss.detach()] + [parameter.grad.clone() for parameter in model.parameters()])
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    graphs = len(_debug_get_cache_entry_list(step))
    assert graphs == 2, f"{graphs} compiled graphs for four batches of different lengths"


def test_seq2seq_start_token_equal_to_pad_id_is_a_key():
    """T5's convention, the decoder starting from the pad token: that first token is no padding.
    With no other pad in the targets, forward equals the decoder run without a target padding
    mask (before, the start token was masked, and the first position saw no key)."""
    torch.manual_seed(3)
    model = Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, **CONFIG, pad_id=PAD).double()
    src, tgt = padded_ids(3, 11, VOCAB_SRC), torch.randint(3, VOCAB_TGT, (3, 6))
    tgt[:, 0] = PAD
    memory, src_padding = model.encode(src)
    hidden = model.transformer.decoder(model.tgt_embed(tgt), memory, memory_key_padding_mask=src_padding,
                                       tgt_is_causal=True)
    torch.testing.assert_close(model(src, tgt), model.output_projection(hidden), atol=1e-12, rtol=1e-12)
    tgt[1, 3:] = PAD  # later pads stay padding
    assert torch.equal(model.target_padding(tgt), (tgt == PAD) & (torch.arange(6) > 0))


def test_seq2seq_options():
    shared = Seq2SeqTransformer(VOCAB_SRC, VOCAB_SRC, **CONFIG, share_embeddings=True, max_positions=64)
    assert shared.src_embed is shared.tgt_embed and shared.src_embed.pos_weight.shape == (64, 32)
    assert shared(padded_ids(2, 5, VOCAB_SRC), padded_ids(2, 4, VOCAB_SRC)).shape == (2, 4, VOCAB_SRC)
    with pytest.raises(ValueError, match="share_embeddings needs equal vocabularies"):
        Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, share_embeddings=True)
    with pytest.raises(ValueError, match="pad_id 30 is outside"):
        Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, pad_id=30)


def greedy_by_recomputation(model, src, max_new_tokens, bos_id, eos_id):
    """The slow definition: run the whole model on the prefix at every step."""
    tokens = torch.full((src.shape[0], 1), bos_id, dtype=src.dtype, device=src.device)
    finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        next_token = model(src, tokens)[:, -1].argmax(-1)
        tokens = torch.cat([tokens, next_token.masked_fill(finished, PAD)[:, None]], dim=1)
        finished |= next_token == eos_id
        if finished.all():
            break
    return tokens[:, 1:]


@pytest.mark.parametrize("device", DEVICES)
def test_generate_equals_full_recomputation(device):
    torch.manual_seed(1)
    # untied: a random tied model tends to repeat one token everywhere
    model = Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, **CONFIG, pad_id=PAD, tie_output=False)
    model = model.double().to(device).eval()
    src = padded_ids(6, 9, VOCAB_SRC).to(device)
    # As EOS, the token the (random) model first emits at the most different steps across rows.
    probe = greedy_by_recomputation(model, src, 12, bos_id=1, eos_id=-1).cpu()  # never ends

    def first_steps(token):
        return {int((row == token).nonzero()[0]) if (row == token).any() else None for row in probe}

    eos_id = max(probe.unique().tolist(), key=lambda token: len(first_steps(token)))
    expected = greedy_by_recomputation(model, src, 12, bos_id=1, eos_id=eos_id)
    ends = [(row == eos_id).nonzero()[0].item() if (row == eos_id).any() else None for row in expected]
    assert len(set(ends)) > 1, f"every row ends at the same step {ends}: the case tests too little"
    generated = model.generate(src, 12, bos_id=1, eos_id=eos_id)
    assert torch.equal(generated, expected)
    assert model.generate(src, 0, bos_id=1, eos_id=eos_id).shape == (6, 0)


@pytest.mark.parametrize("bos_is_pad", [False, True], ids=["bos", "bos-is-pad"])
def test_generate_with_pad_tokens_in_the_prefix_equals_full_recomputation(monkeypatch, bos_is_pad):
    """generate leaves the target padding mask out until a sequence that goes on has emitted a
    pad token (forward masks pad tokens after the start token as keys). Such sequences must still
    get forward's tokens, which here differ from what the same model gives with pad keys left
    visible (so the test fails when the mask is lost); a start token equal to pad_id is none."""
    torch.manual_seed(2)
    model = Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, **CONFIG, pad_id=PAD, tie_output=False).double().eval()
    src = padded_ids(8, 9, VOCAB_SRC)
    bos_id, eos_id = (PAD if bos_is_pad else 1), VOCAB_TGT - 1
    decoder_forward = type(model.transformer.decoder).forward

    def greedy(mask_pads):
        def forward(self, *args, **kwargs):
            if not mask_pads:
                kwargs["tgt_key_padding_mask"] = None
            return decoder_forward(self, *args, **kwargs)
        with monkeypatch.context() as patch:
            patch.setattr(type(model.transformer.decoder), "forward", forward)
            return greedy_by_recomputation(model, src, 12, bos_id=bos_id, eos_id=eos_id)

    weight = model.output_projection.weight
    common = weight[greedy(True).flatten().mode().values.item()].detach().clone()
    # pad_id's logit made a noisy copy of the most emitted token's: greedy then emits pads
    # mid-sequence (the first noise whose pads change the tokens when left visible)
    for seed in range(50):
        noise = torch.randn(common.shape, generator=torch.Generator().manual_seed(seed), dtype=common.dtype)
        with torch.no_grad():
            weight[PAD] = common + 0.3 * noise
        expected = greedy(True)
        if not torch.equal(expected, greedy(False)):
            break
    else:
        pytest.fail("pad keys never change the tokens: the case tests too little")
    assert torch.equal(model.generate(src, 12, bos_id=bos_id, eos_id=eos_id), expected)


def test_generate_rejects_bad_arguments():
    model = Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, **CONFIG)
    src = padded_ids(2, 5, VOCAB_SRC)
    with pytest.raises(ValueError, match="src_ids must be"):
        model.generate(src[0], 4, 1, 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(src, -1, 1, 2)
    with pytest.raises(ValueError, match="eos_id 23 is outside"):
        model.generate(src, 4, 1, VOCAB_TGT)
    learned = Seq2SeqTransformer(VOCAB_SRC, VOCAB_TGT, **{**CONFIG, "max_positions": 6}).eval()
    assert learned.generate(src, 6, 1, 2).shape[1] <= 6  # positions 0 ... 5
    with pytest.raises(ValueError, match="max_new_tokens 7 needs 7 target positions"):  # before any step runs
        learned.generate(src, 7, 1, 2)


def test_demo_runs_end_to_end(capsys):
    assert main(["demo", "--steps", "15", "--eval-size", "8", "--examples", "2", "--no-progress",
                 "--compare", "--max-len", "6"]) == 0
    out = capsys.readouterr().out
    assert "fasttransformer: exact match" in out and "torch.nn: exact match" in out


def test_demo_rejects_bad_options(capsys):
    with pytest.raises(SystemExit, match="--max-len"):
        main(["demo", "--min-len", "5", "--max-len", "3"])
    for argv, pattern in [(["--lr", "0"], "--lr must be a positive number"),
                          (["--lr", "nan"], "--lr must be a positive number"),
                          (["--examples", "-1"], "--examples must be >= 0")]:
        with pytest.raises(SystemExit, match=pattern):
            main(["demo", *argv])
    with pytest.raises(SystemExit):
        main(["demo", "--task", "shuffle"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--device", "tpu"])
    assert "argument --device: 'tpu' is not a device" in capsys.readouterr().err


def test_demo_trains_a_single_step():
    """One step: warm-up only, no decay (its length was 0: a division by zero)."""
    assert main(["demo", "--steps", "1", "--eval-size", "2", "--examples", "0", "--no-progress", "--max-len", "3",
                 "--d-model", "16", "--nhead", "2", "--layers", "1", "--dim-feedforward", "16"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("task", ["reverse", "sort"])
def test_demo_defaults_learn_the_task(task):
    """What the README promises: with its defaults the demo reaches >= 95% exact match."""
    args = demo.build_parser().parse_args(["--task", task, "--no-progress", "--eval-size", "500"])
    result, = demo.run(args)
    assert result.accuracy >= 0.95, f"{task}: exact match {result.accuracy:.1%}"
