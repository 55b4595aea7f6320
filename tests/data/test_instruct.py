"""Instruction data: templates, response-only loss, truncation, packing across boundaries."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from qlora_jax import data
from tests.data.conftest import random_sentence


def _learned_targets(ds: data.InstructDataset, loader=None) -> list[list[int]]:
    """Per example (one example a row, pad mode), the target ids that carry loss."""
    batch = ds.collate([(i,) for i in range(len(ds))], len(ds))
    return [list(batch["targets"][b][batch["loss_mask"][b] == 1]) for b in range(len(ds))]


def _build(write_jsonl, records, tok, seq_len=256, packing=False):
    return data.build_dataset(write_jsonl(records), tok, seq_len, packing=packing)


@pytest.mark.parametrize("tok_name", ["llama_tok", "minilm_tok", "bpe_tok"])
def test_prompt_response_loss_on_response_and_end_only(request, write_jsonl, rng, tok_name):
    tok = request.getfixturevalue(tok_name)
    records = [{"prompt": random_sentence(rng) + " :", "response": random_sentence(rng)}
               for _ in range(6)]
    ds = _build(write_jsonl, records, tok)
    assert ds.format == "prompt_response" and len(ds) == 6
    for r, ids, got in zip(records, ds.ids, _learned_targets(ds)):
        prompt = tok.encode(r["prompt"], add_special_tokens=False)
        response = tok.encode(r["response"], add_special_tokens=False)
        assert list(ids) == [tok.start_id] + prompt + response + [tok.end_id]
        assert got == response + [tok.end_id]


def test_bpe_learned_tokens_decode_to_response(write_jsonl, bpe_tok, rng):
    records = [{"prompt": f"Q: {random_sentence(rng)}?\nA:", "response": f" {random_sentence(rng)}."}
               for _ in range(5)]
    ds = _build(write_jsonl, records, bpe_tok)
    for r, got in zip(records, _learned_targets(ds)):
        assert got[-1] == bpe_tok.eos_id
        assert bpe_tok.decode(got[:-1]) == r["response"]


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_template(write_jsonl, llama_tok, rng, with_input):
    rec = {"instruction": random_sentence(rng), "input": random_sentence(rng) if with_input else "",
           "output": random_sentence(rng)}
    ds = _build(write_jsonl, [rec], llama_tok)
    template = data.ALPACA_PROMPT if with_input else data.ALPACA_PROMPT_NO_INPUT
    prompt = template.format(**rec)
    assert ("### Input:" in prompt) == with_input
    expected = ([llama_tok.bos_id] + llama_tok.encode(prompt, add_special_tokens=False)
                + llama_tok.encode(rec["output"], add_special_tokens=False) + [llama_tok.eos_id])
    assert list(ds.ids[0]) == expected
    assert _learned_targets(ds)[0] == expected[-len(llama_tok.encode(rec["output"], False)) - 1:]
    prompt_only = {k: v for k, v in rec.items() if k != "output"}
    assert data.encode_prompt(prompt_only, "alpaca", llama_tok) == expected[:len(expected) - len(
        _learned_targets(ds)[0])]


def _chat(rng, turns=3):
    messages = [{"role": "system", "content": random_sentence(rng)}]
    for _ in range(turns):
        messages += [{"role": "user", "content": random_sentence(rng)},
                     {"role": "assistant", "content": random_sentence(rng)}]
    return messages


def test_chat_fallback_without_template(write_jsonl, llama_tok, rng):
    messages = _chat(rng)
    assert llama_tok.chat_template is None
    with pytest.warns(UserWarning, match="no chat template"):
        ds = _build(write_jsonl, [{"messages": messages}], llama_tok)
    enc = lambda s: llama_tok.encode(s, add_special_tokens=False)  # noqa: E731
    expected = [t for m in messages if m["role"] == "assistant"
                for t in enc(m["content"]) + [llama_tok.eos_id]]
    assert _learned_targets(ds)[0] == expected
    # The generation prompt is the training sequence up to the last assistant's content.
    with pytest.warns(UserWarning, match="no chat template"):
        prompt = data.encode_prompt({"messages": messages[:-1]}, "chat", llama_tok)
    assert prompt[-3:] == enc("<|assistant|>\n")
    assert list(ds.ids[0][:len(prompt)]) == prompt
    assert list(ds.ids[0][len(prompt):]) == enc(messages[-1]["content"]) + [llama_tok.eos_id]


def test_truncation_drops_examples_without_response(write_jsonl, llama_tok, rng):
    long_prompt = " ".join(["the"] * 50)
    records = [{"prompt": long_prompt, "response": "hot word"},
               {"prompt": "the", "response": random_sentence(rng, 30, 40)}]
    with pytest.warns(UserWarning, match="1 of 2 examples have no response token"):
        ds = _build(write_jsonl, records, llama_tok, seq_len=20)
    assert len(ds) == 1 and ds.dropped == 1 and len(ds.ids[0]) == 20
    assert ds.learned[0][2:].all() and not ds.learned[0][:2].any()
    with pytest.warns(UserWarning), pytest.raises(data.DataError, match="no usable examples"):
        _build(write_jsonl, records[:1], llama_tok, seq_len=20)


def _random_dataset(write_jsonl, tok, rng, n, seq_len, packing):
    records = [{"prompt": random_sentence(rng, 1, 20), "response": random_sentence(rng, 1, 20)}
               for _ in range(n)]
    return _build(write_jsonl, records, tok, seq_len=seq_len, packing=packing)


def test_packing_preserves_tokens_and_boundaries(write_jsonl, llama_tok, rng):
    seq_len = 64
    ds = _random_dataset(write_jsonl, llama_tok, rng, 60, seq_len, packing=True)
    order = rng.permutation(len(ds))
    rows = ds.make_rows(order)
    assert sorted(i for r in rows for i in r) == list(range(len(ds)))   # every example once
    assert len(rows) < len(ds)                               # and several share a row
    batch = ds.collate(rows, len(rows) + 2)                  # two padding rows
    assert batch["weights"].tolist() == [1.0] * len(rows) + [0.0, 0.0]
    for b, row in enumerate(rows):
        start = 0
        for seg, i in enumerate(row, start=1):
            ids, learned = ds.ids[i], ds.learned[i]
            end = start + len(ids)
            sl = slice(start, end)
            assert (batch["input_ids"][b, sl] == ids).all()
            assert (batch["segment_ids"][b, sl] == seg).all()
            assert (batch["position_ids"][b, sl] == np.arange(len(ids))).all()
            assert (batch["targets"][b, start:end - 1] == ids[1:]).all()
            assert (batch["loss_mask"][b, start:end - 1] == learned[1:]).all()
            assert batch["loss_mask"][b, end - 1] == 0       # never predicts the next example
            start = end
        assert start <= seq_len
        assert (batch["segment_ids"][b, start:] == 0).all()
        assert (batch["loss_mask"][b, start:] == 0).all()
        assert (batch["attention_mask"][b] == (batch["segment_ids"][b] > 0)).all()
        assert (batch["input_ids"][b, start:] == llama_tok.pad_id).all()
    assert batch["loss_mask"].sum() == sum(int(l[1:].sum()) for l in ds.learned)
    assert (batch["loss_mask"][len(rows):] == 0).all()


def test_packing_and_padding_carry_the_same_loss_tokens(write_jsonl, llama_tok, rng):
    packed = _random_dataset(write_jsonl, llama_tok, rng, 30, 48, packing=True)
    padded = data.InstructDataset(packed.ids, packed.learned, 48, llama_tok.pad_id, packing=False)
    def learned_pairs(ds):
        rows = ds.make_rows(np.arange(len(ds)))
        b = ds.collate(rows, len(rows))
        m = b["loss_mask"] == 1
        return sorted(zip(b["input_ids"][m].tolist(), b["targets"][m].tolist()))
    assert learned_pairs(packed) == learned_pairs(padded)


def test_instruct_with_tokenizer_without_end_token(write_jsonl, tmp_path, rng):
    from tests.data.conftest import word_level
    import json, os
    d = word_level(str(tmp_path / "t"), None, template=False)
    # A vocabulary without any end token: remove the config hints and the well-known names.
    with open(os.path.join(d, "tokenizer.json")) as f:
        spec = json.load(f)
    for name in ("</s>",):
        spec["model"]["vocab"].pop(name)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "</s>"]
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    tok = data.load_tokenizer(d)
    assert tok.end_id is None
    with pytest.raises(data.DataError, match="no eos"):
        data.build_dataset(write_jsonl([{"prompt": "the", "response": "hot"}]), tok, 16)


def test_hf_labels_match_shifted_targets(write_jsonl, llama_tok, rng):
    ds = _random_dataset(write_jsonl, llama_tok, rng, 12, 40, packing=False)
    batch = ds.collate(ds.make_rows(np.arange(len(ds))), len(ds))
    labels = data.to_hf_labels(batch)
    # transformers: loss over (logits[:, :-1], labels[:, 1:]) where labels != -100.
    shifted = labels[:, 1:]
    mask = batch["loss_mask"][:, :-1] == 1
    assert ((shifted != -100) == mask).all()
    assert (shifted[mask] == batch["targets"][:, :-1][mask]).all()
    assert (labels[:, 0] == -100).all()
    packed = data.InstructDataset(ds.ids, ds.learned, 120, llama_tok.pad_id, packing=True)
    with pytest.raises(data.DataError, match="packing=False"):
        data.to_hf_labels(packed.collate(packed.make_rows(np.arange(len(ds)))[:2], 2))


def test_chat_uses_the_checkpoint_template(write_jsonl, tmp_path, rng):
    from tests.data.test_chat_template import FORMATS, _plain, _tokenizer_dir

    template, specials = FORMATS["qwen2.5"]
    tok = data.load_tokenizer(_tokenizer_dir(str(tmp_path / "tok"), _plain(template), specials))
    records = [{"messages": _chat(rng, int(rng.integers(1, 4)))} for _ in range(5)]
    ds = _build(write_jsonl, records, tok)
    for r, ids, learned in zip(records, ds.ids, ds.learned):
        want_ids, want_mask = data.apply_chat_template(tok, r["messages"])
        assert list(ids) == want_ids and list(learned) == [bool(m) for m in want_mask]
        prompt = data.encode_prompt({"messages": r["messages"][:-1]}, "chat", tok)
        assert prompt == data.apply_chat_template(tok, r["messages"][:-1], True)[0]
        assert list(ids[:len(prompt)]) == prompt and learned[len(prompt)]
        assert not learned[:len(prompt)][-3:].any()
    # Loss: exactly the assistant answers and their <|im_end|>.
    end = tok.token_to_id("<|im_end|>")
    for r, got in zip(records, _learned_targets(ds)):
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert got.count(end) == len(answers)
        assert tok.decode(got) == "".join(answers)
    # Truncation keeps the examples with a learned token left, as for the other formats.
    first = [int(np.argmax(l)) for l in ds.learned]  # first learned token of each example
    cut = first[0] + 1
    kept = sum(f < cut for f in first)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        short = _build(write_jsonl, records, tok, seq_len=cut)
    assert all(len(i) <= cut for i in short.ids) and (len(short), short.dropped) == (kept, 5 - kept)
