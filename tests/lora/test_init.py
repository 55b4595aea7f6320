"""Data-aware inits (PiSSA, OLoRA, LoftQ) against PEFT and, for LoftQ, its paper in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora import init as lora_init
from tests.models import tiny
from tests.models.conftest import llama_ckpt  # noqa: F401

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _logits(model, params, ids, mask):
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids),
                                                    jnp.asarray(mask)))(params))


def _peft_layer(pm, name):
    return dict(pm.named_modules())["base_model.model." + name]


def _align_signs(a_ours, a_ref):
    """Flips each of our rank components to the reference's sign (SVD sign freedom)."""
    s = np.sign(np.sum(a_ours * a_ref, axis=1, keepdims=True))
    return a_ours * s, s


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_matches_peft_and_keeps_outputs(llama_ckpt, init, rng):  # noqa: F811
    path, _ = llama_ckpt("llama_gqa")
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                   init_lora_weights=init)).eval()
    lora = qj.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init=init)
    model, params = qj.from_pretrained(path, dtype=jnp.float32, lora=lora)
    for proj, mod in (("q_proj", "self_attn"), ("down_proj", "mlp")):
        ours = params["model"]["layers"][mod][proj]
        for i in range(2):
            layer = _peft_layer(pm, f"model.layers.{i}.{mod}.{proj}")
            a_ref = layer.lora_A["default"].weight.detach().numpy()  # [R, in]
            b_ref = layer.lora_B["default"].weight.detach().numpy()  # [out, R]
            w_ref = layer.base_layer.weight.detach().numpy()  # residual [out, in]
            a, s = _align_signs(np.asarray(ours["lora_a"][i]).T, a_ref)
            b = np.asarray(ours["lora_b"][i]).T * s.T
            np.testing.assert_allclose(a, a_ref, atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(b, b_ref, atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(np.asarray(ours["kernel"][i]).T, w_ref, atol=2e-5)
    # Output unchanged at init (float32): equal to the plain base and to PEFT's model.
    ids, mask = tiny.left_padded(rng, 2, 8)
    plain, plain_params = qj.from_pretrained(path, dtype=jnp.float32)
    ours = _logits(model, params, ids, mask)
    assert tiny.rel_err(ours, _logits(plain, plain_params, ids, mask), mask) < 1e-5
    with torch.no_grad():
        ref = pm(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    assert tiny.rel_err(ours, ref, mask) < 1e-5


def test_pissa_niter_is_close_to_full_svd(rng):
    # A spectrum that decays: the randomized SVD with subspace iterations finds the top space.
    u, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    v, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    s = 4.0 ** -np.arange(32)
    w = (u[:, :32] * s) @ v.T
    a_full, b_full, _ = lora_init.pissa(w, 4, 2.0)
    a, b, res = lora_init.pissa(w, 4, 2.0, niter=4, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(b @ a, b_full @ a_full, atol=1e-5)
    np.testing.assert_allclose(res + 2.0 * (b @ a), w, atol=1e-6)
    a0, b0, _ = lora_init.pissa(w, 4, 2.0, niter=0, key=jax.random.PRNGKey(1))
    # Zero iterations is a cruder fit of the same rank (and still exact in sum).
    assert np.linalg.norm(b0 @ a0 - b_full @ a_full) >= np.linalg.norm(b @ a - b_full @ a_full)


def _loftq_float64(w, r, scaling, num_iter):
    """LoftQ (Li et al. 2023, Alg. 1) in float64, NF4 by bitsandbytes as PEFT's loftq_init."""
    def q4(x):
        data, state = bnb.functional.quantize_4bit(torch.as_tensor(x, dtype=torch.float32),
                                                   blocksize=64, compress_statistics=False,
                                                   quant_type="nf4")
        return bnb.functional.dequantize_4bit(data, state).double().numpy()
    target = w
    for _ in range(num_iter):
        deq = q4(target)
        u, s, vh = np.linalg.svd(w - deq, full_matrices=False)
        root = np.sqrt(s[:r] / scaling)
        a, b = root[:, None] * vh[:r], u[:, :r] * root
        target = w - scaling * b @ a
    return a, b, deq


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_matches_paper_in_float64(rng, num_iter):
    w = rng.standard_normal((64, 128)) * 0.05
    a, b, q = lora_init.loftq(w.astype(np.float32), 8, 2.0, lora_init.LOFTQ_FLOAT_BASE, num_iter)
    a_ref, b_ref, deq_ref = _loftq_float64(w, 8, 2.0, num_iter)
    deq = np.asarray(qj.quant.dequantize(q, jnp.float32))
    # A code may flip where float32 and float64 residuals straddle a decision boundary.
    assert np.mean(~np.isclose(deq, deq_ref, rtol=1e-4, atol=1e-7)) < 1e-3
    fit, fit_ref = 2.0 * np.asarray(b @ a), 2.0 * b_ref @ a_ref
    assert np.linalg.norm(fit - fit_ref) / np.linalg.norm(fit_ref) < 1e-3
    err = np.linalg.norm(w - deq - fit)
    assert err < np.linalg.norm(w - deq_ref)  # better than the 4-bit base alone


@pytest.mark.slow
def test_loftq_base_plus_adapters_beats_plain_4bit(llama_ckpt, rng):  # noqa: F811
    path, _ = llama_ckpt("llama_gqa")
    quant = qj.QuantConfig()
    ids, mask = tiny.left_padded(rng, 2, 8)
    ref = _logits(*qj.from_pretrained(path, dtype=jnp.float32), ids, mask)
    plain = _logits(*qj.from_pretrained(path, dtype=jnp.float32, quant=quant), ids, mask)
    lora = qj.LoraConfig(r=8, alpha=16, target_modules="all-linear", init="loftq", loftq_iter=2)
    model, params = qj.from_pretrained(path, dtype=jnp.float32, quant=quant, lora=lora)
    assert isinstance(params["model"]["layers"]["mlp"]["up_proj"]["kernel"], qj.quant.QTensor)
    err = tiny.rel_err(_logits(model, params, ids, mask), ref, mask)
    plain_err = tiny.rel_err(plain, ref, mask)
    assert err < 0.9 * plain_err, (err, plain_err)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_4bit_base_decomposes_dequantized_weight(llama_ckpt, init, rng):  # noqa: F811
    # A bitsandbytes-style QTensor kernel: dequantize, decompose, requantize the residual.
    path, _ = llama_ckpt("llama_gqa")
    q_model, q_params = qj.from_pretrained(path, dtype=jnp.float32, quant=qj.QuantConfig())
    lora = qj.LoraConfig(r=4, alpha=8, target_modules=["up_proj"], init=init)
    model = q_model.clone(lora=lora)
    from qlora_jax.checkpoints.hf_load import add_adapters
    params = lora_init.initialize(model, add_adapters(model, q_params))
    old = q_params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    new = params["model"]["layers"]["mlp"]["up_proj"]
    assert isinstance(new["kernel"], qj.quant.QTensor)
    w = np.asarray(qj.quant.dequantize(old, jnp.float32))  # [L, out, in]
    w_res = np.asarray(qj.quant.dequantize(new["kernel"], jnp.float32))
    delta = 2.0 * np.einsum("lir,lro->loi", np.asarray(new["lora_a"]), np.asarray(new["lora_b"]))
    # The residual is requantized: W ~ W_res + s B A up to one 4-bit rounding of the residual.
    step = np.abs(w - np.asarray(qj.quant.dequantize(
        qj.quant.quantize(jnp.asarray(w[0]), "nf4", 64, True), jnp.float32))).max()
    assert np.abs(w_res + delta - w).max() <= 2 * step


def test_bad_init_values_fail_at_config():
    for bad in ("pissa_niter_", "pissa_niter_x", "loftq2", 3):
        with pytest.raises(ValueError, match="LoraConfig.init"):
            qj.LoraConfig(init=bad)
    with pytest.raises(ValueError, match="loftq_iter"):
        qj.LoraConfig(init="loftq", loftq_iter=0)
    assert qj.LoraConfig(init="pissa_niter_16").init == "pissa_niter_16"


def test_loftq_on_a_4bit_kernel_needs_float_weights(rng):
    spec = qj.LoraConfig(r=2, init="loftq").spec("x")
    q = qj.quant.quantize(jnp.asarray(rng.standard_normal((16, 64)), jnp.float32))
    with pytest.raises(ValueError, match="needs the float weights"):
        lora_init.init_kernel(spec, q, jax.random.PRNGKey(0))
