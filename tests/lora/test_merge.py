"""merge / unmerge: float bases exactly, 4-bit bases as PEFT does (dequantize, add, requantize)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora import tree as lora_tree
from qlora_jax.quant.blockwise import dequantize_xla
from tests.conftest import run_seed
from tests.lora.toy import ToyModel


def setup(quant, **lora_kwargs):
    key = jax.random.key(run_seed() % (1 << 30))
    x = jax.random.normal(key, (6, 64))
    cfg = qj.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random", **lora_kwargs)
    model = ToyModel(quant=quant, lora=cfg)
    params = model.init(jax.random.fold_in(key, 1), x)["params"]
    return model, params, x, cfg


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("rslora", [False, True])
def test_float_merge_matches_adapted_output(rslora):
    model, params, x, _ = setup(None, use_rslora=rslora)
    y = model.apply({"params": params}, x)
    merged_model, merged = qj.lora.merge(model, params)
    assert merged_model.lora is None
    assert not any(p[-1].startswith("lora_") for p in lora_tree.flatten(merged))
    assert rel(merged_model.apply({"params": merged}, x), y) < 1e-6


def test_float_merge_is_w_plus_scaled_ba():
    model, params, _, cfg = setup(None)
    _, merged = qj.lora.merge(model, params)
    p = params["layers"]["q_proj"]
    expect = p["kernel"] + (cfg.alpha / cfg.r) * jnp.einsum("lir,lro->lio", p["lora_a"], p["lora_b"])
    np.testing.assert_allclose(merged["layers"]["q_proj"]["kernel"], expect, rtol=1e-6, atol=1e-6)


def test_nf4_merge_requantizes_like_peft():
    model, params, x, cfg = setup(qj.QuantConfig())
    _, merged = qj.lora.merge(model, params)
    p = params["layers"]["v_proj"]
    q = p["kernel"]
    delta = (cfg.alpha / cfg.r) * jnp.einsum("lir,lro->lio", p["lora_a"], p["lora_b"])
    w = dequantize_xla(q, jnp.float32) + jnp.swapaxes(delta, -1, -2)
    for layer in range(q.stack_shape[0]):
        ref = qj.quant.quantize(w[layer], q.qtype, q.block_size, double_quant=True)
        got = jax.tree.map(lambda a: a[layer], merged["layers"]["v_proj"]["kernel"])
        np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(ref.packed))
        np.testing.assert_array_equal(np.asarray(got.absmax), np.asarray(ref.absmax))
        np.testing.assert_array_equal(np.asarray(qj.quant.dequantize(got, impl="xla")),
                                      np.asarray(qj.quant.dequantize(ref, impl="xla")))
    m2 = merged["layers"]["v_proj"]["kernel"]
    assert (m2.qtype, m2.block_size, m2.nested_block_size, m2.dtype) == (
        q.qtype, q.block_size, q.nested_block_size, q.dtype)


def test_unmerge_inverts_float_merge():
    model, params, x, cfg = setup(None)
    ad = qj.lora.adapters(params)
    merged_model, merged = qj.lora.merge(model, params)
    back_model, back = qj.lora.unmerge(merged_model, merged, ad, cfg)
    assert back_model.lora == cfg
    for p, v in lora_tree.flatten(params).items():
        np.testing.assert_allclose(lora_tree.flatten(back)[p], v, rtol=1e-5, atol=1e-6,
                                   err_msg="/".join(p))
    np.testing.assert_allclose(back_model.apply({"params": back}, x),
                               model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_merge_keeps_trained_modules_to_save_unboxed():
    cfg = qj.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=("lm_head",))
    model = ToyModel(lora=cfg)
    x = jnp.ones((2, 64))
    params = model.init(jax.random.key(0), x)["params"]
    params["lm_head"] = jax.tree.map(qj.lora.Trainable, params["lm_head"])
    mask = qj.lora.trainable_mask(params)
    assert mask["lm_head"]["kernel"] is True
    _, merged = qj.lora.merge(model, params)
    assert not isinstance(merged["lm_head"]["kernel"], qj.lora.Trainable)


def test_merge_without_adapters_is_an_error():
    model = ToyModel()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        qj.lora.merge(model, {})
