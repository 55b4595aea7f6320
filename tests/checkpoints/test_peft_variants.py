"""PiSSA / OLoRA / LoftQ adapters written for PEFT: loaded by peft, they give our logits."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora import tree as lora_tree
from tests.models import tiny

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _apply(model, params, ids, mask):
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids),
                                                    jnp.asarray(mask)))(params))


def _torch_out(model, ids, mask):
    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()


def _trained(params, rng):
    """The adapters moved away from their init, as training would."""
    flat = lora_tree.flatten(params)
    for p, v in flat.items():
        if p[-1] in ("lora_a", "lora_b"):
            flat[p] = v + 0.05 * jnp.asarray(rng.standard_normal(v.shape), v.dtype) * \
                jnp.std(v)
    return lora_tree.unflatten(flat)


@pytest.mark.slow
@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True),
                                          ("pissa_niter_2", False)])
def test_converted_adapter_loads_in_peft_on_the_original_base(llama_ckpt, tmp_path, rng, init,
                                                              rslora):
    path, _ = llama_ckpt("llama_gqa")
    lora = qj.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init=init, use_rslora=rslora)
    model, params0 = qj.from_pretrained(path, dtype=jnp.float32, lora=lora)
    params = _trained(params0, rng)
    ids, mask = tiny.left_padded(rng, 2, 8)
    ours = _apply(model, params, ids, mask)
    out = str(tmp_path / "converted")
    qj.save_peft(model, params, out, initial_adapters=qj.lora.adapters(params0))
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    assert cfg["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    assert tiny.rel_err(ours, _torch_out(pm, ids, mask), mask) < 1e-4
    # And here, on the original base: the same function.
    m2, p2 = qj.load_peft(*qj.from_pretrained(path, dtype=jnp.float32), out)
    assert tiny.rel_err(_apply(m2, p2, ids, mask), ours, mask) < 1e-4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_adapter_is_decomposed_again_on_load(llama_ckpt, tmp_path, rng, init):
    # Without initial adapters the file says init_lora_weights="pissa"/"olora": PEFT (and
    # load_peft) decompose the original base again, which rebuilds our residual exactly.
    path, _ = llama_ckpt("llama_gqa")
    lora = qj.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init=init)
    model, params = qj.from_pretrained(path, dtype=jnp.float32, lora=lora)
    params = _trained(params, rng)
    ids, mask = tiny.left_padded(rng, 2, 8)
    ours = _apply(model, params, ids, mask)
    out = str(tmp_path / "plain")
    qj.save_peft(model, params, out)
    assert json.load(open(os.path.join(out, "adapter_config.json")))["init_lora_weights"] == init
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    assert tiny.rel_err(ours, _torch_out(pm, ids, mask), mask) < 1e-4
    m2, p2 = qj.load_peft(*qj.from_pretrained(path, dtype=jnp.float32), out)
    assert tiny.rel_err(_apply(m2, p2, ids, mask), ours, mask) < 1e-4


def test_pissa_niter_needs_initial_adapters(llama_ckpt, tmp_path):
    path, _ = llama_ckpt("llama_gqa")
    lora = qj.LoraConfig(r=2, target_modules=["q_proj"], init="pissa_niter_1")
    model, params = qj.from_pretrained(path, dtype=jnp.float32, lora=lora)
    with pytest.raises(ValueError, match="initial_adapters"):
        qj.save_peft(model, params, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_loftq_adapter_loads_in_peft_on_the_saved_loftq_base(llama_ckpt, tmp_path, rng):
    # PEFT's LoftQ recipe: the base written with LoftQ's (dequantized 4-bit) weights + adapter.
    path, _ = llama_ckpt("llama_gqa")
    lora = qj.LoraConfig(r=4, alpha=4, target_modules=TARGETS, init="loftq")
    model, params = qj.from_pretrained(path, dtype=jnp.float32, quant=qj.QuantConfig(),
                                       lora=lora)
    params = _trained(params, rng)
    ids, mask = tiny.left_padded(rng, 2, 8)
    ours = _apply(model, params, ids, mask)
    qj.save_pretrained(model, params, str(tmp_path / "base"), merge_lora=False,
                       dtype=jnp.float32)
    qj.save_peft(model, params, str(tmp_path / "adapter"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"),
                                                             dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert tiny.rel_err(ours, _torch_out(pm, ids, mask), mask) < 1e-4
