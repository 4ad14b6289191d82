"""The README's Python examples run as written (the README is the user's manual): every
```python block, with the names it leaves to the reader (inputs, a user's model) defined here as
small tensors and modules. An example added to the README without inputs here fails the test,
and so does an entry here whose example is gone."""
import re
import textwrap
from pathlib import Path

import pytest
import torch

import fasttransformer as ft

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    """The README's ```python blocks, dedented (an example inside a list item is indented)."""
    text = README.read_text()
    return [textwrap.dedent(match.group(2))
            for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)]


def embedding_inputs():
    return {"input_ids": torch.randint(0, 1000, (2, 7)), "weight": torch.randn(1000, 512)}


def embedding_check(names):
    assert names["out"].shape == names["x"].shape == (2, 7, 512)


def attention_inputs():
    batch, heads, seqlen_q, seqlen_k = 2, 4, 37, 300
    q = torch.randn(batch, heads, seqlen_q, 64)
    k, v = torch.randn(batch, heads, seqlen_k, 64), torch.randn(batch, heads, seqlen_k, 64)
    padding = torch.rand(batch, seqlen_k) < 0.3
    return {"q": q, "k": k, "v": v, "padding": padding, "Lq": seqlen_q, "Lk": seqlen_k,
            "bool_or_float_mask": torch.rand(seqlen_q, seqlen_k) < 0.7}


def attention_check(names):
    assert names["out"].shape == (2, 4, 37, 64) and names["out"].isfinite().all()


def layers_inputs():
    return {"torch_transformer": torch.nn.Transformer(d_model=512, batch_first=True),
            "my_model": torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.TransformerEncoderLayer(64, 4))}


def layers_check(names):
    assert type(names["my_model"][1]) is ft.nn.TransformerEncoderLayer
    assert type(names["my_model"][1].self_attn) is ft.nn.MultiheadAttention
    torch.testing.assert_close(names["model"].state_dict(), names["torch_transformer"].state_dict(), rtol=0, atol=0)


def decoding_inputs():
    layer = ft.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    batch, prompt_len = 2, 5
    padding = torch.zeros(batch, prompt_len, dtype=torch.bool)
    padding[1, :2] = True  # left padding
    return {"stack": ft.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(),
            "embed": ft.nn.TokenPositionalEmbedding(100, 64), "lm_head": torch.nn.Linear(64, 100), "B": batch,
            "prompt_len": prompt_len, "max_new_tokens": 3, "prompt": torch.randint(1, 100, (batch, prompt_len)),
            "padding": padding}


def decoding_check(names):
    assert names["cache"].length == 5 + 3 and names["padding"].shape == (2, 8)
    assert names["hidden"].shape == (2, 1, 64) and names["hidden"].isfinite().all()


def seq2seq_inputs():
    return {"src_vocab_size": 100, "tgt_vocab_size": 120, "src_ids": torch.randint(3, 100, (2, 6)),
            "tgt_ids": torch.randint(3, 120, (2, 5))}


def seq2seq_check(names):
    assert names["logits"].shape == (2, 5, 120)
    assert names["new_ids"].shape[0] == 2 and 1 <= names["new_ids"].shape[1] <= 128


EXAMPLES = {  # a line of the example: (its inputs, what must hold after it ran)
    "out = token_positional_embedding(input_ids, weight,": (embedding_inputs, embedding_check),
    "out = scaled_dot_product_attention(q, k, v, is_causal=True,": (attention_inputs, attention_check),
    "model.load_state_dict(torch_transformer.state_dict(), strict=True)": (layers_inputs, layers_check),
    "cache = ft.nn.DecoderCache(len(stack.layers),": (decoding_inputs, decoding_check),
    "new_ids = model.generate(src_ids,": (seq2seq_inputs, seq2seq_check),
}


def test_every_readme_example_has_inputs_here():
    blocks = python_blocks()
    assert len(blocks) >= len(EXAMPLES)
    for block in blocks:
        assert sum(line in block for line in EXAMPLES) == 1, f"README example without inputs in this test:\n{block}"
    for line in EXAMPLES:
        assert any(line in block for block in blocks), f"no README example holds {line!r} any more"


@pytest.mark.parametrize("line", EXAMPLES)
def test_readme_example_runs(line):
    blocks = [block for block in python_blocks() if line in block]
    if not blocks:
        pytest.fail(f"no README example holds {line!r}")
    if "token_positional_embedding" in blocks[0] and not ft._extension.available():
        pytest.skip("fasttransformer._C is not built")
    inputs, check = EXAMPLES[line]
    torch.manual_seed(0)
    names = {"torch": torch, "ft": ft, **inputs()}  # imported by the README's earlier examples
    exec(compile(blocks[0], f"README.md example ({line})", "exec"), names)  # noqa: S102 (our own README)
    check(names)
