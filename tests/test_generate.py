"""generate (KV cache, greedy/sampling, EOS, left padding) and perplexity against transformers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.generate import adapters_in_compute_dtype
from qlora_jax.lora.tree import flatten
from tests.models import tiny
from tests.models.conftest import llama_ckpt  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("variant", ["llama_gqa", "mistral"])
def test_greedy_equals_transformers_generate(llama_ckpt, variant, rng):
    path, ref = llama_ckpt(variant)
    ids, mask = tiny.left_padded(rng, 3, 7)
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                            max_new_tokens=10, do_sample=False, pad_token_id=0).numpy()
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    out = np.asarray(qj.generate(model, params, ids, 10, attention_mask=mask))
    assert out.shape == (3, 17)
    # transformers stops early when every row has ended; compare what it produced.
    np.testing.assert_array_equal(out[:, :want.shape[1]], want)


def test_greedy_is_the_argmax_continuation_of_apply_for_qlora(llama_ckpt, rng):
    path, _ = llama_ckpt("llama3_rope")
    lora = qj.LoraConfig(r=4, target_modules="all-linear", init="random")
    model, params = qj.from_pretrained(path, dtype=jnp.float32, quant=qj.QuantConfig(), lora=lora,
                                       seed=int(rng.integers(1 << 30)))
    ids, mask = tiny.left_padded(rng, 2, 6)
    out = np.asarray(qj.generate(model, params, ids, 6, attention_mask=mask, eos_token_id=[]))
    # Causal attention: one forward over the finished sequence gives, at every position, the
    # logits of its prefix; each generated token must be the argmax after its prefix.
    full_mask = np.concatenate([mask, np.ones((2, 6), mask.dtype)], axis=1)
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(out), jnp.asarray(full_mask))
    np.testing.assert_array_equal(out[:, 6:], np.asarray(jnp.argmax(logits[:, 5:-1], axis=-1)))


def test_adapters_cast_once_to_the_compute_dtype(llama_ckpt, rng):
    """generate casts float32 adapters of a bfloat16 model once (LoraDense would cast them at
    every call): the same logits as apply on the stored params, DoRA modules untouched."""
    path, _ = llama_ckpt("llama_gqa")
    for use_dora in (False, True):
        lora = qj.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init="random",
                             use_dora=use_dora)
        model, params = qj.from_pretrained(path, dtype=jnp.bfloat16, lora=lora,
                                           seed=int(rng.integers(1 << 30)))
        cast = adapters_in_compute_dtype(model, params)
        leaves = {"/".join(p): v for p, v in flatten(cast).items()}
        adapters = {k: v for k, v in leaves.items() if k.endswith(("lora_a", "lora_b"))}
        assert adapters and all(v.dtype == (jnp.float32 if use_dora else jnp.bfloat16)
                                for v in adapters.values()), use_dora
        ids = jnp.asarray(rng.integers(3, 60, (2, 6)))
        want = model.apply({"params": params}, ids)
        got = model.apply({"params": cast}, ids)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_prefill_sends_only_the_last_position_through_the_head(llama_ckpt, rng):
    """The prompt's logits [B, T, V] are never built (34 GB at 32 x 2,048 tokens and a 128k
    vocabulary): the lowered generate has no array of that shape, only [B, 1, V] ones."""
    from qlora_jax.generate import _generate

    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    b, t, v = 3, 11, model.config.vocab_size
    ids = jnp.asarray(rng.integers(3, v, (b, t)))
    args = (model, params, ids, jnp.ones((b, t), jnp.int32), jax.random.PRNGKey(0),
            jnp.float32(1.0), jnp.float32(1.0), jnp.asarray([2]), jnp.asarray(0), None)
    text = _generate.lower(*args, max_new_tokens=4, sample=False, use_top_p=False).as_text()
    assert f"{b}x1x{v}xf32" in text
    assert f"{b}x{t}x{v}x" not in text


def test_chunked_prefill_equals_one_prefill(llama_ckpt, rng):
    """A prompt prefilled a few tokens a step (left-padded with masked slots to whole chunks:
    11 tokens in 3 steps of 4) decodes the same tokens as one prefill, with left-padded rows and
    a sliding window (Mistral's, 5 tokens: shorter than the prompt)."""
    path, _ = llama_ckpt("mistral")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    ids, mask = tiny.left_padded(rng, 3, 11)
    whole = np.asarray(qj.generate(model, params, ids, 6, attention_mask=mask, eos_token_id=[],
                                   prefill_chunk=0))
    got = np.asarray(qj.generate(model, params, ids, 6, attention_mask=mask, eos_token_id=[],
                                 prefill_chunk=4))
    np.testing.assert_array_equal(got, whole)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        qj.generate(model, params, ids, 2, attention_mask=mask, prefill_chunk=-1)


def test_prompts_of_nearby_lengths_share_one_compiled_program(llama_ckpt, rng):
    """Prompts are left-padded to a multiple of ``pad_to_multiple_of`` before compiling: lengths
    5 and 7 share one program at 8 (and the tokens equal exact-length decoding)."""
    from qlora_jax.generate import _generate

    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    outs = {}
    for t in (5, 7):
        ids, mask = tiny.left_padded(rng, 2, t)
        before = _generate._cache_size()
        outs[t] = np.asarray(qj.generate(model, params, ids, 4, attention_mask=mask,
                                         eos_token_id=[], pad_to_multiple_of=8))
        compiled = _generate._cache_size() - before
        assert outs[t].shape == (2, t + 4)
        np.testing.assert_array_equal(outs[t][:, :t], ids)
        exact = qj.generate(model, params, ids, 4, attention_mask=mask, eos_token_id=[],
                            pad_to_multiple_of=1)
        np.testing.assert_array_equal(outs[t], np.asarray(exact))
        assert compiled <= 1 if t == 5 else compiled == 0, (t, compiled)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        qj.generate(model, params, ids, 2, pad_to_multiple_of=0)


def test_prefill_chunk_bounds_the_attention_scores():
    from qlora_jax.generate import PREFILL_SCORES_BUDGET, prefill_chunk_for

    assert prefill_chunk_for(1, 32, 2048, 256) == 0  # 0.6 GB of scores: one piece
    for b, h, t, new in [(32, 32, 2048, 256), (1, 32, 32768, 256), (1, 64, 131072, 64),
                         (8, 32, 2048, 128)]:
        c = prefill_chunk_for(b, h, t, new)
        assert 64 <= c < t and c & (c - 1) == 0, c
        scores = b * h * c * (t + new) * 4
        assert scores <= PREFILL_SCORES_BUDGET < 2 * scores or c == 64, (b, h, t, c)


def test_eos_stops_a_row_and_pads_after_it(llama_ckpt, rng):
    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    ids, mask = tiny.left_padded(rng, 2, 5)
    free = np.asarray(qj.generate(model, params, ids, 6, attention_mask=mask, eos_token_id=[]))
    eos = int(free[0, 6])  # row 0's second new token
    out = np.asarray(qj.generate(model, params, ids, 6, attention_mask=mask, eos_token_id=eos,
                                 pad_token_id=0))
    stop = int(np.argmax(free[0, 5:] == eos))
    np.testing.assert_array_equal(out[0, :5 + stop + 1], free[0, :5 + stop + 1])
    assert np.all(out[0, 5 + stop + 1:] == 0)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(llama_ckpt, rng):
    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    ids = rng.integers(3, tiny.VOCAB, (2, 4))
    kw = dict(eos_token_id=[], temperature=1.5)
    a = np.asarray(qj.generate(model, params, ids, 12, seed=1, **kw))
    b = np.asarray(qj.generate(model, params, ids, 12, seed=1, **kw))
    c = np.asarray(qj.generate(model, params, ids, 12, seed=2, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < tiny.VOCAB
    greedy = np.asarray(qj.generate(model, params, ids, 12, eos_token_id=[]))
    nucleus = np.asarray(qj.generate(model, params, ids, 12, seed=3, top_p=1e-6, **kw))
    np.testing.assert_array_equal(nucleus, greedy)


def test_generate_rejects_right_padding(llama_ckpt):
    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    with pytest.raises(ValueError, match="left-padded"):
        qj.generate(model, params, np.ones((1, 3), np.int32), 2,
                    attention_mask=np.array([[1, 1, 0]]))


def test_perplexity_equals_transformers_cross_entropy(llama_ckpt, rng):
    path, ref = llama_ckpt("qwen2_tied")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    batches = [tiny.left_padded(rng, 3, 9) for _ in range(2)]
    total, count = 0.0, 0
    for ids, mask in batches:
        with torch.no_grad():
            logits = ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        tok = torch.as_tensor(ids[:, 1:])
        valid = torch.as_tensor((mask[:, 1:] == 1) & (mask[:, :-1] == 1))
        nll = -logp.gather(-1, tok[..., None])[..., 0]
        total += float(nll[valid].sum())
        count += int(valid.sum())
    want = math.exp(total / count)
    with jax.default_matmul_precision("highest"):  # float32 dots, not TF32, on GPUs
        got = qj.eval.perplexity(model, params, [{"input_ids": i, "attention_mask": m}
                                                 for i, m in batches])
    assert got == pytest.approx(want, rel=1e-4)


def test_stops_at_every_end_id_the_checkpoint_names(llama_ckpt, rng, tmp_path):
    import json
    import shutil

    import transformers

    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    ids = rng.integers(3, tiny.VOCAB, (1, 5))
    free = np.asarray(qj.generate(model, params, ids, 12, eos_token_id=[]))[0, 5:]
    # Two end ids of the free continuation: the later one named in config.json, the earlier one
    # only in generation_config.json, so only a decoder that reads both stops at the earlier.
    first = next(i for i in range(1, 12) if free[i] not in free[:i])
    late = next((i for i in range(first + 1, 12) if free[i] not in free[:i]), None)
    assert late is not None, f"continuation too repetitive: {free}"
    early_id, late_id = int(free[first]), int(free[late])
    d = shutil.copytree(path, tmp_path / "ckpt")
    with open(d / "config.json") as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = late_id
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    with open(d / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [late_id, early_id], "pad_token_id": 0}, f)
    model, params = qj.from_pretrained(str(d), dtype=jnp.float32)
    assert model.config.eos_token_id == (late_id, early_id)
    out = np.asarray(qj.generate(model, params, ids, 12, pad_token_id=0))[0, 5:]
    np.testing.assert_array_equal(out[:first + 1], free[:first + 1])
    assert (out[first + 1:] == 0).all()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with torch.no_grad():  # transformers reads generation_config.json too, and stops there
        want = ref.generate(torch.as_tensor(ids), max_new_tokens=12, do_sample=False).numpy()
    np.testing.assert_array_equal(want[0, 5:], free[:first + 1])
    # config.json's list alone is honoured as well.
    cfg["eos_token_id"] = [late_id, early_id]
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    (d / "generation_config.json").unlink()
    model, _ = qj.from_pretrained(str(d), dtype=jnp.float32)
    assert model.config.eos_token_id == (late_id, early_id)
