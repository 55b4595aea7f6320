"""``qj.from_pretrained`` on the real SmolLM2-135M-Instruct Q4_1 GGUF, against transformers.

transformers' GGUF loader (dequantized to float32) is the oracle; the model is loaded once a
module (about 15 s for ours and 10-50 s for transformers on 2 shared cores). The whole module is
in the slow tier: with some of its tests in each tier, both tiers loaded the two models.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from tests.models.tiny import rel_err

torch = pytest.importorskip("torch")

# Every test needs the two loaded models (about 20 s of setup): the slow tier, loaded once.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    model, params = qj.from_pretrained(smollm2_gguf, dtype=jnp.float32)
    return model, params


@pytest.fixture(scope="module")
def smollm2_torch(smollm2_gguf):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
        dtype=torch.float32).eval()


def _ids(rng, vocab):
    ids = rng.integers(0, vocab, size=(2, 16))
    ids[0, :6] = [1, 4093, 198, 6004, 2, 198]  # <|im_start|>user\nhi<|im_end|>\n
    return ids


def test_config_and_tied_embeddings(smollm2, smollm2_torch):
    model, params = smollm2
    c, ref = model.config, smollm2_torch.config
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
            c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.max_position_embeddings) == ("llama", 49152, 576, 1536, 30, 9, 3, 64, 8192)
    assert c.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert c.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert c.tie_word_embeddings and ref.tie_word_embeddings
    assert "lm_head" not in params
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)


def test_float32_logits_equal_transformers(smollm2, smollm2_torch, rng):
    model, params = smollm2
    ids = _ids(rng, model.config.vocab_size)
    ours = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    with torch.no_grad():
        ref = smollm2_torch(torch.as_tensor(ids)).logits.numpy()
    assert rel_err(ours, ref) < 1e-4


def test_weights_equal_transformers(smollm2, smollm2_torch):
    """The q/k permutation undone and every name mapped: per-tensor equality on layer 3."""
    _, params = smollm2
    sd = smollm2_torch.state_dict()
    layers = params["model"]["layers"]
    for group, name in (("self_attn", "q_proj"), ("self_attn", "k_proj"),
                        ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                        ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
        ours = np.asarray(layers[group][name]["kernel"][3]).T
        np.testing.assert_array_equal(ours, sd[f"model.layers.3.{group}.{name}.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(params["model"]["embed_tokens"]["embedding"]),
                                  sd["model.embed_tokens.weight"].numpy())


def test_nf4_load(smollm2_gguf, smollm2, smollm2_torch, rng):
    """Each tensor quantized as qj.quant.quantize quantizes transformers' dequantized weight."""
    model, params = smollm2
    qmodel, qparams = qj.from_pretrained(smollm2_gguf, dtype=jnp.float32, quant=qj.QuantConfig())
    kernel = qparams["model"]["layers"]["self_attn"]["k_proj"]["kernel"]
    assert isinstance(kernel, qj.quant.QTensor) and kernel.qtype == "nf4"
    want = qj.quant.quantize(smollm2_torch.state_dict()["model.layers.5.self_attn.k_proj.weight"]
                             .numpy())
    for name, arr in want.arrays().items():
        np.testing.assert_array_equal(np.asarray(getattr(kernel, name)[5]), np.asarray(arr))
    ids = _ids(rng, model.config.vocab_size)
    ref = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    out = qmodel.apply({"params": qparams}, jnp.asarray(ids, jnp.int32))
    # NF4 on top of Q4_1 on random ids: measured 0.27 relative; a wrong layout gives > 1.
    assert rel_err(out, ref) < 0.4


def test_merged_lora_f16_roundtrip_through_transformers(smollm2_gguf, smollm2, tmp_path, rng):
    """Load, add a non-zero LoRA, save merged F16 GGUF; transformers reads the same model."""
    import transformers

    from qlora_jax.checkpoints.hf_load import add_adapters
    from qlora_jax.lora.tree import flatten, unflatten
    model, params = smollm2
    model = model.clone(lora=qj.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    flat = flatten(add_adapters(model, params))
    for k, v in flat.items():
        if k[-1] == "lora_b":
            flat[k] = jnp.asarray(0.02 * rng.standard_normal(v.shape), jnp.float32)
    params = unflatten(flat)
    tok = qj.data.load_tokenizer(smollm2_gguf)
    out = qj.save_pretrained(model, params, str(tmp_path / "merged.gguf"), format="gguf",
                             tokenizer=tok)
    merged_model, merged = qj.lora.merge(model, params)
    stored = unflatten({p: v.astype(jnp.float16).astype(jnp.float32)
                        if p[-1] in ("kernel", "embedding") else v
                        for p, v in flatten(merged).items()})  # what the F16 file holds
    ids = _ids(rng, model.config.vocab_size)
    want = merged_model.apply({"params": stored}, jnp.asarray(ids, jnp.int32))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="merged.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = ref(torch.as_tensor(ids)).logits.numpy()
    assert rel_err(got, want) < 1e-4
    base = smollm2[0].apply({"params": smollm2[1]}, jnp.asarray(ids, jnp.int32))
    assert rel_err(got, base) > 1e-2  # the merged adapter changed the model
    reread = qj.data.load_tokenizer(out)
    assert reread.metadata["tokenizer.ggml.tokens"] == tok.metadata["tokenizer.ggml.tokens"]
    assert reread.metadata["tokenizer.ggml.merges"] == tok.metadata["tokenizer.ggml.merges"]
    assert reread.chat_template == tok.chat_template
    text = "<|im_start|>user\nWhat is 2+2? Ünïcödé 🙂<|im_end|>\n"
    assert reread.encode(text) == tok.encode(text)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="merged.gguf")
    assert ref_tok(text)["input_ids"] == tok.encode(text)
