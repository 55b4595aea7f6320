"""Packed rows through the train step: the same loss and gradients as one example a row.

A tiny QLoRA Llama (random adapters, so every gradient is nonzero) scores the same random
instruction examples packed (`InstructDataset(packing=True)`, segment-masked attention, positions
restarting per example) and padded (one example a row); loss sums, loss weights and adapter
gradients agree in float32 to 1e-5 relative, under every remat policy and with gradient
accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qlora_jax as qj
from qlora_jax import data
from qlora_jax.lora import params as lp
from qlora_jax.models import build_model
from qlora_jax.train.state import create_state
from qlora_jax.train.step import make_train_step
from qlora_jax.train.task import Task

V, T, N = 96, 40, 12


CONFIG = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6)


def _model(remat="none"):
    return build_model(CONFIG, dtype=jnp.float32, param_dtype=jnp.float32, remat=remat,
                       quant=qj.QuantConfig(),
                       lora=qj.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                          init="random"))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1234)
    model = _model()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *model.dummy_inputs())["params"]
    ids, learned = [], []
    for n in rng.integers(4, T // 2, N):
        ids.append(rng.integers(3, V, n).astype(np.int32))
        flags = np.zeros(n, bool)
        flags[rng.integers(1, n - 1):] = True
        learned.append(flags)
    packed = data.InstructDataset(ids, learned, T, pad_id=0, packing=True)
    padded = data.InstructDataset(ids, learned, T, pad_id=0, packing=False)
    rows = packed.make_rows(np.arange(N))
    assert len(rows) < N / 2 and max(len(r) for r in rows) >= 3   # rows really hold several
    return model, params, packed.collate(rows, len(rows)), padded.collate(
        padded.make_rows(np.arange(N)), N)


def _sums_and_grads(model, params, batch, packed):
    task = Task(model, "causal_lm", right_padded=True, packed=packed)
    trainable, frozen = lp.partition(params)

    def loss(t):
        s = task.sums(lp.combine(t, frozen), {k: jnp.asarray(v) for k, v in batch.items()})
        return s[0], s
    grads, sums = jax.jit(jax.grad(loss, has_aux=True))(trainable)
    return [float(x) for x in sums], grads


def _close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.linalg.norm(x - y) <= rtol * max(np.linalg.norm(y), 1e-30)


def test_packed_rows_give_the_loss_and_gradients_of_one_example_a_row(setup):
    model, params, packed, padded = setup
    assert int(packed["loss_mask"].sum()) == int(padded["loss_mask"].sum())
    (p_loss, p_weight, p_correct), p_grads = _sums_and_grads(model, params, packed, True)
    (u_loss, u_weight, u_correct), u_grads = _sums_and_grads(model, params, padded, False)
    assert p_weight == u_weight and p_correct == u_correct
    assert p_loss == pytest.approx(u_loss, rel=1e-5)
    _close(p_grads, u_grads)
    # Without segments the packed rows would attend across examples: a different loss.
    crossed = {k: v for k, v in packed.items() if k != "segment_ids"}
    crossed["segment_ids"] = (packed["segment_ids"] > 0).astype(np.int32)
    crossed["position_ids"] = np.where(packed["segment_ids"] > 0,
                                       np.arange(T, dtype=np.int32)[None], 0)
    (x_loss, _, _), _ = _sums_and_grads(model, params, crossed, True)
    assert abs(x_loss - u_loss) > 1e-3 * abs(u_loss)


@pytest.mark.parametrize("remat", ["full"] + [pytest.param(m, marks=pytest.mark.slow) for m in
                                               ("dots_saveable", "qkv", "attention", "offload")])
def test_every_remat_policy_trains_packed_rows_alike(setup, remat):
    model, params, packed, _ = setup
    (ref_loss, _, _), ref = _sums_and_grads(model, params, packed, True)
    (loss, _, _), grads = _sums_and_grads(_model(remat), params, packed, True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    _close(grads, ref)


def test_gradient_accumulation_over_packed_rows(setup):
    model, params, packed, _ = setup
    rows = packed["input_ids"].shape[0] // 2 * 2
    batch = {k: v[:rows] for k, v in packed.items()}
    task = Task(model, "causal_lm", right_padded=True, packed=True)
    tx = optax.adam(1e-2)
    out = []
    for accum in (1, 2):
        state = create_state(jax.tree.map(jnp.copy, params), tx, seed=0)  # the step donates it
        step = make_train_step(task, tx, optax.constant_schedule(1e-2), accum_steps=accum,
                               dropout=False)
        state, m = step(state, batch)
        out.append((float(m["loss"]), float(m["tokens"]), float(m["slots"]),
                    jax.device_get(state.trainable)))
    (l1, tok1, slots1, t1), (l2, tok2, slots2, t2) = out
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert tok1 == tok2 == float(batch["attention_mask"].sum()) and slots1 == slots2 == rows * T
    _close(t2, t1, rtol=1e-5)
