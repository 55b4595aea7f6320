"""The models on a GPU: Pallas 4-bit kernels under nn.scan, cuDNN/XLA attention, generate, offload remat.

Skipped without a GPU (CI is CPU-only); run on a GPU machine with
``python -m pytest tests/models/test_gpu.py`` or ``scripts/gpu_check.sh tests``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from tests.conftest import run_seed
from tests.models import tiny

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def test_qlora_forward_pallas_equals_xla_and_transformers(llama_ckpt, rng):
    path, ref = llama_ckpt("llama_gqa")
    ids, mask = tiny.left_padded(rng, 3, 12)
    with torch.no_grad():
        want = ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        model, params = qj.from_pretrained(path, dtype=jnp.float32)
        out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert tiny.rel_err(out, want, mask) < 1e-4
    lora = qj.LoraConfig(r=4, target_modules="all-linear", init="random")
    model, params = qj.from_pretrained(path, dtype=jnp.bfloat16, quant=qj.QuantConfig(),
                                       lora=lora)
    assert qj.quant.resolve_impl(model.impl) == "pallas"
    run = jax.jit(lambda m, p: m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)),
                  static_argnums=0)
    pallas = run(model, params)
    xla = run(model.clone(impl="xla"), params)
    assert tiny.rel_err(pallas, xla, mask) < 2e-2


def test_greedy_generate_equals_transformers_on_gpu(llama_ckpt, rng):
    path, ref = llama_ckpt("mistral")
    ids, mask = tiny.left_padded(rng, 2, 7)
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                            max_new_tokens=8, do_sample=False, pad_token_id=0).numpy()
    with jax.default_matmul_precision("highest"):
        model, params = qj.from_pretrained(path, dtype=jnp.float32)
        out = np.asarray(qj.generate(model, params, ids, 8, attention_mask=mask))
    np.testing.assert_array_equal(out[:, :want.shape[1]], want)


@pytest.fixture(scope="module")
def qlora_llama(llama_ckpt):
    """(model, trainable, frozen): the GQA test Llama, bf16, NF4 base, random r=4 adapters.

    Loaded (and quantized) once for the module's tests.
    """
    path, _ = llama_ckpt("llama_gqa")
    lora = qj.LoraConfig(r=4, target_modules="all-linear", init="random")
    model, params = qj.from_pretrained(path, dtype=jnp.bfloat16, quant=qj.QuantConfig(),
                                       lora=lora)
    trainable, frozen = qj.lora.partition(params)
    return model, trainable, frozen


@pytest.fixture(scope="module")
def fixed_ids():
    """Token ids [2, 32] from the run's seed (the same in every run unless QLORA_JAX_SEED)."""
    return jnp.asarray(np.random.default_rng(run_seed()).integers(3, tiny.VOCAB, (2, 32)))


def _loss_and_grads(model, trainable, frozen, ids):
    """(logits [B, T, V] float32, gradients of mean(logits^2) in the adapters)."""
    def loss(t):
        logits = model.apply({"params": qj.lora.combine(t, frozen)}, ids).astype(jnp.float32)
        return jnp.mean(logits ** 2), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return np.asarray(logits), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]


@pytest.fixture(scope="module")
def no_remat(qlora_llama, fixed_ids):
    """The logits and gradients without remat (the reference of every remat mode)."""
    model, trainable, frozen = qlora_llama
    return _loss_and_grads(model.clone(remat="none"), trainable, frozen, fixed_ids)


@pytest.mark.parametrize("remat,mlp_chunk", [
    ("full", 0), ("dots_saveable", 0), ("offload", 0), ("qkv", 0), ("attention", 0),
    ("full_offload", 0), ("full_offload", 8), ("none", 8)])
def test_qlora_gradients_with_each_remat_mode(qlora_llama, fixed_ids, no_remat, remat, mlp_chunk):
    """Remat recomputes the same forward: the gradients equal the no-remat ones up to bf16
    rounding (XLA may fuse the recomputed ops differently); so do the chunked MLP and the
    layer inputs kept in host memory (``full_offload``: on a GPU, real host transfers)."""
    model, trainable, frozen = qlora_llama
    _, want = no_remat
    _, got = _loss_and_grads(model.clone(remat=remat, mlp_chunk=mlp_chunk), trainable, frozen,
                             fixed_ids)
    for a, b in zip(want, got):
        assert np.all(np.isfinite(b))
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a) + 1e-6


def test_cudnn_attention_equals_xla_forward_and_gradients(qlora_llama, fixed_ids):
    """cuDNN's flash attention against XLA's, both in bfloat16, on fixed inputs.

    Tolerances: both compute the scores and softmax in float32 but round the probabilities to
    bfloat16 (unit roundoff 2^-9 = 2e-3) before the PV product, in different orders (cuDNN in
    blocks with online rescaling, and it recomputes them in its backward pass); over 2 layers,
    the LM head and the backward pass that gives a norm-relative difference of about 1e-2 on
    the logits and on all adapter gradients together (2e-2 and 3e-2 allowed). A single
    adapter's gradient can be small next to that rounding noise, so each one alone gets 1e-1;
    a wrong mask or scale differs by O(1).
    """
    model, trainable, frozen = qlora_llama
    cud, g_cud = _loss_and_grads(model.clone(attention="cudnn"), trainable, frozen, fixed_ids)
    xla, g_xla = _loss_and_grads(model.clone(attention="xla"), trainable, frozen, fixed_ids)
    assert np.linalg.norm(cud - xla) <= 2e-2 * np.linalg.norm(xla)
    flat = lambda gs: np.concatenate([g.ravel() for g in gs])  # noqa: E731
    assert np.linalg.norm(flat(g_cud) - flat(g_xla)) <= 3e-2 * np.linalg.norm(flat(g_xla))
    for a, b in zip(g_xla, g_cud):
        assert np.all(np.isfinite(b))
        assert np.linalg.norm(a - b) <= 1e-1 * np.linalg.norm(a) + 1e-6
