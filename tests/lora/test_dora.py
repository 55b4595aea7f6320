"""DoRA against PEFT: LoraDense alone (float and bitsandbytes 4-bit bases, values and gradients),
merge / unmerge, and adapters both ways on tiny Llama models."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora import tree as lora_tree
from tests.lora.test_dense import Wrap, plan_for, rel
from tests.models import tiny
from tests.models.conftest import llama_ckpt  # noqa: F401

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


class _M(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _peft_dora(lin, r, alpha, rng):
    torch.manual_seed(int(rng.integers(1 << 30)))
    pm = peft.get_peft_model(_M(lin), peft.LoraConfig(target_modules=["lin"], r=r,
                                                      lora_alpha=alpha, use_dora=True,
                                                      init_lora_weights=False))
    layer = pm.base_model.model.lin
    mag = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # a trained magnitude: away from the norm it starts at
        mag.mul_(torch.from_numpy(1 + 0.2 * rng.standard_normal(mag.shape).astype(np.float32)))
    return pm, layer


def _ours(layer, kernel, bias=None):
    p = {"kernel": kernel, "lora_a": jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
         "lora_b": jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T),
         "lora_magnitude": jnp.asarray(layer.lora_magnitude_vector["default"].weight.detach()
                                       .numpy())}
    if bias is not None:
        p["bias"] = jnp.asarray(bias)
    return {"lin": p}


def _check_against_torch(pm, layer, params, model, x, tol):
    xt = torch.from_numpy(x)
    out_t = pm(xt)
    out_t.pow(2).sum().backward()
    ours, vjp = jax.vjp(lambda p: model.apply({"params": p}, jnp.asarray(x)), params)
    assert rel(ours, out_t.detach().numpy()) < tol
    (g,) = vjp(2 * ours)
    g = g["lin"]
    # PEFT detaches the weight norm: the same gradients mean the same stop_gradient.
    assert rel(g["lora_a"].T, layer.lora_A["default"].weight.grad.numpy()) < tol
    assert rel(g["lora_b"].T, layer.lora_B["default"].weight.grad.numpy()) < tol
    assert rel(g["lora_magnitude"],
               layer.lora_magnitude_vector["default"].weight.grad.numpy()) < tol


def test_dora_dense_equals_peft_values_and_grads(rng):
    d_in, d_out, r, alpha = 48, 40, 4, 12
    lin = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.standard_normal((d_out, d_in)).astype(np.float32)
                                          / math.sqrt(d_in)))
        lin.bias.copy_(torch.from_numpy(rng.standard_normal(d_out).astype(np.float32)))
    w, b = lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()
    pm, layer = _peft_dora(lin, r, alpha, rng)
    params = _ours(layer, jnp.asarray(w.T), b)
    model = Wrap(d_out, plan_for(qj.LoraConfig(r=r, alpha=alpha, target_modules=["lin"],
                                               use_dora=True)))
    x = rng.standard_normal((3, 5, d_in)).astype(np.float32)
    _check_against_torch(pm, layer, params, model, x, 1e-5)
    # Init: the magnitude starts at ||W + s B A||_row, so outputs equal plain LoRA's.
    init = model.init(jax.random.key(0), jnp.asarray(x))["params"]["lin"]
    norm = np.linalg.norm(np.asarray(init["kernel"]) + alpha / r * np.asarray(init["lora_a"])
                          @ np.asarray(init["lora_b"]), axis=0)
    np.testing.assert_allclose(init["lora_magnitude"], norm, rtol=1e-6)


def test_dora_on_bnb_4bit_base_equals_peft(rng):
    bnb = pytest.importorskip("bitsandbytes")
    d_in, d_out, r = 128, 64, 8
    w = rng.standard_normal((d_out, d_in)).astype(np.float32) * 0.05
    lin = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32,
                            compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False,
                                   compress_statistics=True, quant_type="nf4")
    lin = lin.to("cpu")
    pm, layer = _peft_dora(lin, r, 16, rng)
    pm.train()  # keep bitsandbytes' CPU weight layout (see formats.md harness traps)
    q_bnb = layer.base_layer.weight
    sd = {"weight": q_bnb.data}
    sd.update({"weight." + k: v for k, v in q_bnb.quant_state.as_dict(packed=True).items()})
    params = _ours(layer, qj.quant.from_bnb_state_dict(sd))
    model = Wrap(d_out, plan_for(qj.LoraConfig(r=r, alpha=16, target_modules=["lin"],
                                               use_dora=True)), use_bias=False)
    x = rng.standard_normal((4, d_in)).astype(np.float32)
    _check_against_torch(pm, layer, params, model, x, 1e-5)


@pytest.mark.parametrize("quant", [None, qj.QuantConfig()])
def test_dora_merge_and_unmerge(llama_ckpt, rng, quant):  # noqa: F811
    path, _ = llama_ckpt("llama_gqa")
    lora = qj.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init="random",
                         use_dora=True)
    model, params = qj.from_pretrained(path, dtype=jnp.float32, quant=quant, lora=lora)
    flat = lora_tree.flatten(params)
    for p in [p for p in flat if p[-1] == "lora_magnitude"]:
        flat[p] = flat[p] * jnp.asarray(1 + 0.1 * rng.standard_normal(flat[p].shape), jnp.float32)
    params = lora_tree.unflatten(flat)
    ids, mask = tiny.left_padded(rng, 2, 8)
    run = lambda m, p: np.asarray(m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))
    ours = run(model, params)
    norms = qj.lora.dora_norms(model, params)
    plain, merged = qj.lora.merge(model, params)
    assert "lora_magnitude" not in merged["model"]["layers"]["mlp"]["down_proj"]
    if quant is not None:
        # 4-bit: the merged weight (m/n)(W + s B A), W dequantized, is requantized once.
        k = params["model"]["layers"]["mlp"]["down_proj"]
        w = np.swapaxes(np.asarray(qj.quant.dequantize(k["kernel"], jnp.float32)), -1, -2)
        v = w + 2.0 * np.einsum("lir,lro->lio", np.asarray(k["lora_a"]), np.asarray(k["lora_b"]))
        v = v * (np.asarray(k["lora_magnitude"]) / np.linalg.norm(v, axis=-2))[:, None, :]
        got = np.swapaxes(np.asarray(qj.quant.dequantize(
            merged["model"]["layers"]["mlp"]["down_proj"]["kernel"], jnp.float32)), -1, -2)
        assert np.linalg.norm(got - v) / np.linalg.norm(v) < 0.12  # one NF4 rounding
    else:
        assert tiny.rel_err(run(plain, merged), ours, mask) < 1e-5
        m2, p2 = qj.lora.unmerge(plain, merged, qj.lora.adapters(params), lora,
                                 weight_norms=norms)
        np.testing.assert_allclose(p2["model"]["layers"]["mlp"]["down_proj"]["kernel"],
                                   params["model"]["layers"]["mlp"]["down_proj"]["kernel"],
                                   atol=1e-5)
        assert tiny.rel_err(run(m2, p2), ours, mask) < 1e-5
        with pytest.raises(ValueError, match="weight_norms"):
            qj.lora.unmerge(plain, merged, qj.lora.adapters(params), lora)


@pytest.mark.slow
@pytest.mark.parametrize("bnb_base", [False, True])
def test_dora_adapters_both_ways_with_peft(llama_ckpt, tmp_path, rng, bnb_base):  # noqa: F811
    path, _ = llama_ckpt("llama_gqa")
    ids, mask = tiny.left_padded(rng, 2, 8)
    load_kw = {}
    if bnb_base:  # a bitsandbytes 4-bit checkpoint, read as stored on both sides
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.float32)
        load_kw = dict(quantization_config=cfg, device_map="cpu")
        q4 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                               **load_kw)
        q4.save_pretrained(str(tmp_path / "q4"))
        path = str(tmp_path / "q4")

    def torch_base():
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              **load_kw)
        return m.train() if bnb_base else m.eval()

    def torch_logits(pm):
        with torch.no_grad():
            return pm(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()

    # PEFT's DoRA adapter (trained magnitudes) loads here with PEFT's logits.
    torch.manual_seed(int(rng.integers(1 << 30)))
    pm = peft.get_peft_model(torch_base(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
        init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.1 + 0.1 * torch.randn(p.shape))
    pm.save_pretrained(str(tmp_path / "theirs"))
    want = torch_logits(pm)
    model, params = qj.load_peft(*qj.from_pretrained(path, dtype=jnp.float32),
                                 str(tmp_path / "theirs"))
    assert model.lora.use_dora
    run = lambda m, p: np.asarray(m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))
    assert tiny.rel_err(run(model, params), want, mask) < 1e-4
    # Ours (random start, trained magnitudes) loads in PEFT with our logits.
    lora = qj.LoraConfig(r=4, alpha=16, target_modules=["k_proj", "down_proj"], init="random",
                         use_dora=True)
    model, params = qj.from_pretrained(path, dtype=jnp.float32, lora=lora,
                                       seed=int(rng.integers(1 << 30)))
    flat = lora_tree.flatten(params)
    for p in [p for p in flat if p[-1] == "lora_magnitude"]:
        flat[p] = flat[p] * 1.2
    params = lora_tree.unflatten(flat)
    qj.save_peft(model, params, str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(torch_base(), str(tmp_path / "ours"))
    pm = pm.train() if bnb_base else pm.eval()  # bnb's CPU layout: see formats.md traps
    assert tiny.rel_err(run(model, params), torch_logits(pm), mask) < 1e-4
