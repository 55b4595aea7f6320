"""The train step: trainable-only gradients, masked CE, chunked CE, accumulation, offload, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qlora_jax as qj
from qlora_jax.lora import params as lp
from qlora_jax.lora import tree as lora_tree
from qlora_jax.train import loss as losses
from qlora_jax.train import optim
from qlora_jax.train.state import create_state
from qlora_jax.train.step import evaluate, make_eval_step, make_train_step, train_step_fn
from qlora_jax.train.task import Task, causal_targets
from tests.conftest import run_seed
from tests.train.toy_lm import ToyClassifier, ToyLM, box_saved, random_params

V, B, T = 67, 4, 12


def optim_cfg(**kw):
    c = dict(name="adamw", learning_rate=1e-2, schedule="constant", warmup_steps=0,
             warmup_ratio=0.0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
             max_grad_norm=1.0)
    c.update(kw)
    return c


def lm_batch(rng, b=B, t=T):
    ids = rng.integers(0, V, (b, t)).astype(np.int32)
    lengths = rng.integers(t // 2, t + 1, b)
    attn = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    prompt = rng.integers(1, t // 2, b)
    mask = ((np.arange(t)[None] >= prompt[:, None]) & (np.arange(t)[None] < lengths[:, None] - 1))
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], 1)
    return {"input_ids": ids, "targets": targets, "loss_mask": mask.astype(np.float32),
            "attention_mask": attn}


_CACHE: dict = {}


def lm_setup(rng, *, quant=None, dtype=jnp.float32, remat="none", offload=False, accum=1,
             chunk=0, lora_dtype=None, dropout=0.0, params=None, seed=0, nan_at_step=-1,
             **ocfg):
    """(model, task, state, step, params); steps of equal settings are compiled once."""
    lora = qj.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random",
                         dropout=dropout)
    model = ToyLM(vocab=V, lora=lora, quant=quant, dtype=dtype, remat=remat)
    params = random_params(model, rng, T) if params is None else params
    cfg = optim_cfg(**ocfg)
    schedule = optim.make_schedule(cfg, 10)
    tx = optim.make_optimizer(cfg, schedule)
    state = create_state(params, tx, seed, lora_dtype, offload)
    task = Task(model, "causal_lm", chunk)
    key = (quant, dtype, remat, offload, accum, chunk, lora_dtype, dropout, nan_at_step,
           tuple(sorted(ocfg.items())))
    if key not in _CACHE:
        _CACHE[key] = jax.jit(train_step_fn(task, tx, schedule, accum_steps=accum,
                                            offload_state=offload, dropout=dropout > 0,
                                            nan_at_step=nan_at_step), donate_argnums=0)
    return model, task, state, _CACHE[key], params


def run(rng_or_none, batches, **kw):
    """Final (losses, trainable, opt_state) after one step per batch."""
    _, _, state, step, _ = lm_setup(rng_or_none, **kw)
    losses_ = []
    for b in batches:
        state, m = step(state, b)
        losses_.append(float(m["loss"]))
    return losses_, jax.device_get(state.trainable), jax.device_get(state.opt_state), state


@pytest.fixture(scope="module")
def base_params():
    rng = np.random.default_rng(run_seed())
    model = ToyLM(vocab=V, lora=qj.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    return random_params(model, rng, T)


def tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


def test_gradients_only_for_trainable_and_frozen_untouched(rng):
    quant = qj.QuantConfig(block_size=32)
    _, task, state, step, params = lm_setup(rng, quant=quant, dtype=jnp.bfloat16,
                                            lora_dtype=jnp.bfloat16, learning_rate=3e-2)
    frozen_before = jax.device_get(state.frozen)
    # The frozen tree holds the QTensors and the head; the trainable tree exactly the adapters.
    flat_t = lora_tree.flatten(state.trainable)
    assert all(p[-1] in ("lora_a", "lora_b") for p in flat_t) and len(flat_t) == 4
    assert any(isinstance(v, qj.quant.QTensor) for v in lora_tree.flatten(state.frozen).values())
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.bfloat16)}
    # The optimizer state covers the trainable leaves only.
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(state.trainable)
    batch = lm_batch(rng)
    first = None
    for i in range(12):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
        if i == 1:  # (the first call may compile for uncommitted inputs)
            compiled_after_two = step._cache_size()
    # bf16 compute over a 4-bit base with bf16 adapters learns; the base is bit-for-bit intact.
    assert float(m["loss"]) < 0.8 * first
    assert tree_equal(jax.device_get(state.frozen), frozen_before)
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.bfloat16)}
    # The optimizer state keeps its dtypes step after step (no recompilation, no promotion).
    assert {x.dtype for x in jax.tree.leaves(state.opt_state[1][0].mu)} == {jnp.dtype(jnp.bfloat16)}
    assert step._cache_size() == compiled_after_two
    assert int(state.step) == 12


def test_loss_is_response_only_and_matches_float64(rng, base_params):
    model, task, state, _, _ = lm_setup(rng, params=base_params)
    batch = lm_batch(rng)
    params = state.params
    logits = np.asarray(model.apply({"params": params}, batch["input_ids"],
                                    attention_mask=batch["attention_mask"]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    want = (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    sums = jax.jit(task.sums)
    s, w, _ = sums(params, batch)
    np.testing.assert_allclose(float(s / w), want, rtol=1e-5)
    # Targets under a zero mask do not matter.
    other = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"],
                                         rng.integers(0, V, batch["targets"].shape)))
    assert float(sums(params, other)[0]) == float(s)


def test_hf_labels_are_shifted_and_minus_100_ignored(rng):
    batch = lm_batch(rng)
    labels = np.where(rng.random((B, T)) < 0.4, -100, batch["input_ids"])
    targets, mask = causal_targets({"labels": jnp.asarray(labels)})
    np.testing.assert_array_equal(np.asarray(mask)[:, :-1], labels[:, 1:] != -100)
    assert not np.asarray(mask)[:, -1].any()
    sel = labels[:, 1:] != -100
    np.testing.assert_array_equal(np.asarray(targets)[:, :-1][sel], labels[:, 1:][sel])


def test_chunked_loss_equals_full_loss_and_grads(rng, base_params):
    model, task, state, _, _ = lm_setup(rng, params=base_params)
    chunked = Task(model, "causal_lm", loss_chunk=5)  # 5 does not divide T = 12
    batch = lm_batch(rng)

    def value_and_grad(t):
        def f(tr):
            s, w, c = t.sums(lp.combine(tr, state.frozen), batch)
            return s / w, c
        return jax.jit(jax.value_and_grad(f, has_aux=True))(state.trainable)
    (full, c_full), g_full = value_and_grad(task)
    (part, c_part), g_part = value_and_grad(chunked)
    np.testing.assert_allclose(float(part), float(full), rtol=1e-5)
    assert float(c_part) == float(c_full)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_part)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_builds_full_logits(rng, base_params):
    model, _, state, _, _ = lm_setup(rng, params=base_params)
    batch = lm_batch(rng, b=2, t=64)
    chunked = Task(model, "causal_lm", loss_chunk=8)

    def grad_hlo(task):
        f = lambda tr: task.sums(lp.combine(tr, state.frozen), batch)[0]  # noqa: E731
        return jax.jit(jax.grad(f)).lower(state.trainable).as_text()
    full_shape, chunk_shape = f"<2x64x{V}xf32>", f"<2x8x{V}xf32>"
    assert full_shape in grad_hlo(Task(model, "causal_lm"))
    text = grad_hlo(chunked)
    assert full_shape not in text and chunk_shape in text


def test_chunked_loss_needs_model_methods():
    with pytest.raises(ValueError, match="hidden_states"):
        Task(ToyClassifier(), "causal_lm", loss_chunk=4)


def test_gradient_accumulation_equals_full_batch(rng, base_params):
    batches = [lm_batch(rng) for _ in range(2)]
    ref = run(rng, batches, params=base_params)
    acc = run(rng, batches, params=base_params, accum=4)
    np.testing.assert_allclose(acc[0], ref[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref[1]), jax.tree.leaves(acc[1])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # Summation order differs (micro-batches), and Adam divides by sqrt(v): an element with
        # a near-zero gradient can move by a few 1e-5 after two steps (seen: 3.4e-5 on 0.2).
        # So: the whole leaf to 1e-5, every element to 2e-4 of the leaf's largest value.
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a)
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-4 * np.abs(a).max())


def test_offloaded_optimizer_state_equals_device_run_exactly(rng, base_params):
    batches = [lm_batch(rng) for _ in range(3)]
    _, _, state, _, _ = lm_setup(rng, params=base_params, offload=True)
    assert optim.memory_kinds(state.opt_state) == {"pinned_host"}
    ref = run(rng, batches, params=base_params)
    off = run(rng, batches, params=base_params, offload=True)
    assert optim.memory_kinds(ref[3].opt_state) == {"device"}
    assert optim.memory_kinds(off[3].opt_state) == {"pinned_host"}
    assert optim.memory_kinds(off[3].trainable) == {"device"}
    assert off[0] == ref[0]
    assert tree_equal(off[1], ref[1]) and tree_equal(off[2], ref[2])


def test_remat_policies_give_the_same_gradients(rng, base_params):
    batches = [lm_batch(rng)]
    ref = run(rng, batches, params=base_params)
    for remat in ("full", "dots_saveable", "offload"):
        out = run(rng, batches, params=base_params, remat=remat)
        np.testing.assert_allclose(out[0], ref[0], rtol=1e-6, err_msg=remat)
        for a, b in zip(jax.tree.leaves(ref[1]), jax.tree.leaves(out[1])):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=remat)


def test_dropout_key_depends_on_step_and_seed_only(rng, base_params):
    batches = [lm_batch(rng)] * 2
    a = run(rng, batches, params=base_params, dropout=0.3, seed=3)
    b = run(rng, batches, params=base_params, dropout=0.3, seed=3)
    c = run(rng, batches, params=base_params, dropout=0.3, seed=4)
    det = run(rng, batches, params=base_params)
    assert a[0] == b[0] and tree_equal(a[1], b[1])
    assert a[0] != c[0] and a[0][0] != det[0][0]
    # The same batch at step 0 and step 1 sees different dropout masks.
    assert a[0][0] != a[0][1]


def test_clipping_bounds_the_update(rng, base_params):
    _, _, state, step, _ = lm_setup(rng, params=base_params, name="sgd", b1=0.0,
                                    learning_rate=1.0, max_grad_norm=1e-3)
    before = jax.device_get(state.trainable)
    state, m = step(state, lm_batch(rng))
    delta = optax.tree.norm(jax.tree.map(lambda a, b: a - b, jax.device_get(state.trainable),
                                         before))
    assert float(m["grad_norm"]) > 1e-2
    np.testing.assert_allclose(float(delta), 1e-3, rtol=1e-3)


def test_nan_injection_only_at_that_step(rng, base_params):
    _, _, state, step, _ = lm_setup(rng, params=base_params, nan_at_step=1)
    state, m0 = step(state, lm_batch(rng))
    state, m1 = step(state, lm_batch(rng))
    assert np.isfinite(float(m0["loss"])) and np.isnan(float(m1["loss"]))


def test_classification_step_and_eval(rng):
    lora = qj.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"])
    model = ToyClassifier(vocab=V, num_labels=3, lora=lora)
    params = box_saved(model, random_params(model, rng, T))
    cfg = optim_cfg(learning_rate=3e-2)
    sched = optim.make_schedule(cfg, 30)
    tx = optim.make_optimizer(cfg, sched)
    state = create_state(params, tx, 0)
    assert "classifier" in state.trainable
    task = Task(model, "classification")
    step = make_train_step(task, tx, sched)
    ids = rng.integers(0, V, (8, T)).astype(np.int32)
    labels = (ids[:, 0] % 3).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
             "weights": np.ones(8, np.float32)}
    eval_step = make_eval_step(task)
    # Loss matches float64 CE of the logits, with a zero-weight row ignored.
    wbatch = dict(batch, weights=np.array([1] * 7 + [0], np.float32))
    logits = np.asarray(task.logits(state.params, wbatch), np.float64)
    ce = np.log(np.exp(logits).sum(-1)) - logits[np.arange(8), labels]
    out = jax.device_get(eval_step(state.trainable, state.frozen, wbatch))
    np.testing.assert_allclose(out["loss_sum"] / out["weight"], ce[:7].mean(), rtol=1e-5)
    assert float(out["correct"]) == float((logits.argmax(-1) == labels)[:7].sum())
    before = evaluate(eval_step, state, [batch], "classification")
    for _ in range(30):
        state, m = step(state, batch)
    after = evaluate(eval_step, state, [batch], "classification")
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_accuracy"] >= before["eval_accuracy"]
    assert "eval_perplexity" not in after


def test_eval_perplexity_for_lm(rng, base_params):
    _, task, state, _, _ = lm_setup(rng, params=base_params)
    batches = [lm_batch(rng) for _ in range(2)]
    eval_step = make_eval_step(task)
    res = evaluate(eval_step, state, batches, "causal_lm")
    outs = [jax.device_get(eval_step(state.trainable, state.frozen, b)) for b in batches]
    s = sum(float(o["loss_sum"]) for o in outs)
    w = sum(float(b["loss_mask"].sum()) for b in batches)
    np.testing.assert_allclose(res["eval_loss"], s / w, rtol=1e-6)
    np.testing.assert_allclose(res["eval_perplexity"], np.exp(s / w), rtol=1e-5)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_schedules(kind):
    cfg = optim_cfg(schedule=kind, learning_rate=1.0, warmup_steps=4, end_lr_ratio=0.1)
    s = optim.make_schedule(cfg, 14)
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4)], [0.0, 0.5, 1.0], atol=1e-6)
    end, mid = float(s(14)), float(s(9))
    if kind == "constant":
        assert end == 1.0 and mid == 1.0
    else:  # cosine and linear both pass 0.55 half-way from 1.0 to 0.1
        np.testing.assert_allclose([mid, end], [0.55, 0.1], atol=1e-6)
    if kind == "linear":
        np.testing.assert_allclose(float(s(6)), 1.0 - 0.9 * 2 / 10, atol=1e-6)
    ratio = optim.make_schedule(optim_cfg(schedule=kind, learning_rate=1.0, warmup_ratio=0.5), 8)
    np.testing.assert_allclose(float(ratio(2)), 0.5, atol=1e-6)


@pytest.mark.parametrize("ratio", [1.0, 16.0])
def test_loraplus_b_gets_ratio_times_a_learning_rate(rng, ratio):
    # SGD without momentum: each leaf's update is -lr * grad, with lr x ratio on lora_b only.
    lr = 0.05
    cfg = optim_cfg(name="sgd", b1=0.0, learning_rate=lr, max_grad_norm=0.0,
                    loraplus_lr_ratio=ratio)
    tx = optim.make_optimizer(cfg, optim.make_schedule(cfg, 10))
    tree = {"q": {"lora_a": rng.standard_normal((8, 4)), "lora_b": rng.standard_normal((4, 6))},
            "head": qj.lora.Trainable(rng.standard_normal((6, 3)))}
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    np.testing.assert_allclose(updates["q"]["lora_a"], -lr * grads["q"]["lora_a"], rtol=1e-6)
    np.testing.assert_allclose(updates["q"]["lora_b"], -lr * ratio * grads["q"]["lora_b"],
                               rtol=1e-6)
    np.testing.assert_allclose(updates["head"].value, -lr * grads["head"].value, rtol=1e-6)


def test_loraplus_ratio_must_be_positive():
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        optim.make_optimizer(optim_cfg(loraplus_lr_ratio=0.0), optax.constant_schedule(1.0))
