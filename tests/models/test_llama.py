"""Llama family (Llama GQA, Llama 3 RoPE, Mistral sliding window, Qwen2 biases + tied) vs transformers."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora.tree import flatten
from qlora_jax.models.common import make_rope
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from tests.models import tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("variant", tiny.LLAMA_VARIANTS)
def test_float32_logits_equal_transformers_with_left_padding(llama_ckpt, variant, rng):
    path, ref_model = llama_ckpt(variant)
    ids, mask = tiny.left_padded(rng, 3, 11)
    ref = _torch_logits(ref_model, ids, mask)
    model, params = qj.checkpoints.from_pretrained(path, dtype=jnp.float32)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out.shape == (3, 11, tiny.VOCAB) and out.dtype == jnp.float32
    err = tiny.rel_err(out, ref, mask)
    assert err < 1e-4, f"{variant}: relative error {err}"


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2_tied"])
def test_bfloat16_logits_close_to_transformers(llama_ckpt, variant, rng):
    path, ref_model = llama_ckpt(variant)
    ids, mask = tiny.left_padded(rng, 2, 9)
    ref = _torch_logits(ref_model, ids, mask)
    model, params = qj.checkpoints.from_pretrained(path, dtype=jnp.bfloat16, float32_logits=True)
    assert params["model"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.float32
    err = tiny.rel_err(out, ref, mask)
    assert err < 2e-2, f"{variant}: relative error {err}"


def test_zero_initialised_adapters_leave_logits_unchanged_to_the_bit(llama_ckpt, rng):
    path, _ = llama_ckpt("qwen2_tied")
    ids, mask = tiny.left_padded(rng, 2, 8)
    outs = []
    for lora in (None, qj.LoraConfig(r=4, target_modules="all-linear")):
        model, params = qj.from_pretrained(path, dtype=jnp.bfloat16, quant=qj.QuantConfig(),
                                           lora=lora)
        outs.append(np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids),
                                                    jnp.asarray(mask)), np.float32))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2_tied"])
def test_hidden_states_then_head_equals_logits(llama_ckpt, variant, rng):
    path, _ = llama_ckpt(variant)
    model, params = qj.from_pretrained(path, dtype=jnp.float32,
                                       lora=qj.LoraConfig(r=2, target_modules="all-linear",
                                                          init="random"))
    ids, mask = tiny.left_padded(rng, 2, 7)

    @jax.jit
    def both(p, i, m):
        h = model.apply({"params": p}, i, m, method="hidden_states")
        return model.apply({"params": p}, i, m), h, model.apply(
            {"params": p}, h[:, 3:], method="logits_from_hidden")

    logits, hidden, tail = both(params, jnp.asarray(ids), jnp.asarray(mask))
    assert hidden.shape == (2, 7, 64)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(logits[:, 3:]), rtol=1e-5, atol=1e-5)


def test_no_mask_equals_all_ones_mask(llama_ckpt, rng):
    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.checkpoints.from_pretrained(path, dtype=jnp.float32)
    ids = jnp.asarray(rng.integers(3, tiny.VOCAB, (2, 7)))
    a = jax.jit(model.apply)({"params": params}, ids)
    b = jax.jit(model.apply)({"params": params}, ids, jnp.ones((2, 7), jnp.int32))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_exact_params_tree_of_tiny_llama():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.ones((1, 4), jnp.int32)))["params"]
    got = {"/".join(p): tuple(v.shape) for p, v in flatten(params).items()}
    L = 3
    want = {
        "model/embed_tokens/embedding": (50, 32),
        "model/layers/input_layernorm/scale": (L, 32),
        "model/layers/post_attention_layernorm/scale": (L, 32),
        "model/layers/self_attn/q_proj/kernel": (L, 32, 32),
        "model/layers/self_attn/k_proj/kernel": (L, 32, 16),
        "model/layers/self_attn/v_proj/kernel": (L, 32, 16),
        "model/layers/self_attn/o_proj/kernel": (L, 32, 32),
        "model/layers/mlp/gate_proj/kernel": (L, 32, 48),
        "model/layers/mlp/up_proj/kernel": (L, 32, 48),
        "model/layers/mlp/down_proj/kernel": (L, 48, 32),
        "model/norm/scale": (32,),
        "lm_head/kernel": (32, 50),
    }
    assert got == want
    # With QLoRA: 4-bit kernels [L, out, in] and adapters beside them; lm_head stays float.
    qmodel = model.clone(quant=qj.QuantConfig(), lora=qj.LoraConfig(r=4, target_modules=["q_proj"]))
    qparams = jax.eval_shape(lambda: qmodel.init(jax.random.PRNGKey(0),
                                                 jnp.ones((1, 4), jnp.int32)))["params"]
    flat = {"/".join(p): v for p, v in flatten(qparams).items()}
    assert set(flat) == set(want) | {"model/layers/self_attn/q_proj/lora_a",
                                     "model/layers/self_attn/q_proj/lora_b"}
    assert isinstance(flat["model/layers/mlp/down_proj/kernel"], qj.quant.QTensor)
    assert flat["model/layers/mlp/down_proj/kernel"].shape == (L, 32, 48)
    assert flat["model/layers/self_attn/q_proj/lora_a"].shape == (L, 32, 4)
    assert flat["model/layers/self_attn/q_proj/lora_b"].shape == (L, 4, 32)
    assert not isinstance(flat["lm_head/kernel"], qj.quant.QTensor)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_rope_inv_freq_equals_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=50000.0,
                                   max_position_embeddings=128, rope_scaling=dict(scaling))
    fn = ROPE_INIT_FUNCTIONS[scaling["rope_type"]]
    ref, attn = fn(cfg, "cpu")
    rope = make_rope(64, 50000.0, scaling, 128)
    np.testing.assert_allclose(np.asarray(rope.inv_freq, np.float32), ref.numpy(), rtol=1e-6)
    assert rope.attention_factor == pytest.approx(attn)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "linear", "factor": 2.0},
])
def test_scaled_rope_logits_beyond_max_positions_equal_transformers(tmp_path, scaling, rng):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=tiny.VOCAB, max_position_embeddings=8,
                                   rope_scaling=dict(scaling))
    ref = tiny.randomize(transformers.LlamaForCausalLM(cfg), int(rng.integers(1 << 30))).eval()
    ref.save_pretrained(str(tmp_path))
    ids = rng.integers(3, tiny.VOCAB, (2, 14))  # longer than max_position_embeddings
    mask = np.ones_like(ids)
    want = _torch_logits(ref, ids, mask)
    model, params = qj.from_pretrained(str(tmp_path), dtype=jnp.float32)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert tiny.rel_err(out, want) < 1e-4


def test_unknown_rope_type_is_named():
    with pytest.raises(ValueError, match="longrope.*supported"):
        make_rope(64, 1e4, {"rope_type": "longrope"}, 128)


def _compile_seconds(layers: int) -> float:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16)
    model = LlamaForCausalLM(cfg, quant=qj.QuantConfig(), lora=qj.LoraConfig(r=4),
                             remat="full")
    ids = jnp.ones((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]
    a_params, frozen = qj.lora.partition(params)

    def loss(a, f, x):
        return model.apply({"params": qj.lora.combine(a, f)}, x).astype(jnp.float32).mean()

    t0 = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(a_params, frozen, ids).compile()
    return time.perf_counter() - t0


@pytest.mark.slow
def test_80_layer_training_step_compiles_about_as_fast_as_2_layers():
    t2, t80 = _compile_seconds(2), _compile_seconds(80)
    print(f"compile: 2 layers {t2:.2f}s, 80 layers {t80:.2f}s")
    assert t80 < 60.0
    assert t80 < 5 * t2 + 5.0  # scanned layers: depth does not multiply compile time


def test_remat_modes_give_the_same_gradients(llama_ckpt, rng):
    path, _ = llama_ckpt("llama_gqa")
    lora = qj.LoraConfig(r=4, target_modules="all-linear", init="random")
    base, params = qj.from_pretrained(path, dtype=jnp.float32, lora=lora,
                                      seed=int(rng.integers(1 << 30)))
    trainable, frozen = qj.lora.partition(params)
    ids = jnp.asarray(rng.integers(3, tiny.VOCAB, (2, 6)))

    def grads(model):
        def loss(t):
            return model.apply({"params": qj.lora.combine(t, frozen)}, ids).mean()
        return jax.jit(jax.grad(loss))(trainable)

    g0 = grads(base)
    for remat in ("dots_saveable", "qkv", "attention"):  # "full"/"offload": policy only
        g1 = grads(base.clone(remat=remat))
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            scale = float(np.max(np.abs(np.asarray(a)))) + 1e-12
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale,
                                       err_msg=remat)


def test_bad_remat_mode_is_named():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="remat='sometimes'"):
        LlamaForCausalLM(cfg, remat="sometimes").init(jax.random.PRNGKey(0),
                                                       jnp.ones((1, 2), jnp.int32))
