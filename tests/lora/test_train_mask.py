"""Only adapters (and modules_to_save) train: masks, gradients and optimizer state.

Freezing has one form: ``qj.lora.partition`` splits the params into trainable and frozen trees,
gradients and any optax optimizer see the trainable tree only, ``qj.lora.combine`` joins them
(what ``qlora_jax.train`` does).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qlora_jax as qj
from qlora_jax.lora import tree as lora_tree
from tests.conftest import run_seed
from tests.lora.toy import ToyModel


@pytest.fixture(params=[None, qj.QuantConfig()], ids=["float", "nf4"])
def setup(request):
    cfg = qj.LoraConfig(r=4, target_modules="all-linear", modules_to_save=("lm_head",))
    model = ToyModel(lora=cfg, quant=request.param)
    x = jax.random.normal(jax.random.key(run_seed() % (1 << 30)), (4, 64))
    params = model.init(jax.random.key(0), x)["params"]
    params["lm_head"] = jax.tree.map(qj.lora.Trainable, params["lm_head"])
    return model, params, x


def test_mask_marks_exactly_adapters_and_saved(setup):
    _, params, _ = setup
    flat = lora_tree.flatten(qj.lora.trainable_mask(params))
    trainable = {"/".join(p) for p, v in flat.items() if v}
    assert trainable == {"layers/q_proj/lora_a", "layers/q_proj/lora_b", "layers/v_proj/lora_a",
                         "layers/v_proj/lora_b", "lm_head/kernel"}
    assert {"/".join(p) for p, v in flat.items() if not v} == {
        "layers/q_proj/kernel", "layers/v_proj/kernel", "layers/v_proj/bias"}


def test_gradients_and_adamw_state_cover_only_trainable_leaves(setup):
    model, params, x = setup
    trainable, frozen = qj.lora.partition(params)

    def loss(t):
        return jnp.mean(model.apply({"params": qj.lora.combine(t, frozen)}, x) ** 2)

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert lora_tree.nbytes(grads) == lora_tree.nbytes(trainable)

    tx = optax.adamw(1e-2)
    state = tx.init(trainable)
    adapter_bytes = lora_tree.nbytes(trainable)
    # AdamW keeps mu and nu for each trainable leaf, plus one int32 step counter.
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert state_bytes == 2 * adapter_bytes + 4
    updates, state = tx.update(grads, state, trainable)
    new = qj.lora.combine(optax.apply_updates(trainable, updates), frozen)
    flat_new, flat_old = lora_tree.flatten(new), lora_tree.flatten(params)
    assert flat_new.keys() == flat_old.keys()
    for p, v in flat_new.items():
        if p[-1].startswith("lora_") or p[0] == "lm_head":
            continue
        # Frozen leaves (QTensors included) are the very same objects, untouched.
        assert v is flat_old[p], "/".join(p)
    assert float(loss(qj.lora.partition(new)[0])) != float(loss(trainable))


def test_frozen_base_is_never_differentiated(setup):
    model, params, x = setup
    trainable, frozen = qj.lora.partition(params)
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda t: model.apply({"params": qj.lora.combine(t, frozen)}, x).sum()))(trainable)
    n_frozen = sum(np.prod(np.shape(l)) for l in jax.tree.leaves(frozen))
    out_sizes = [int(np.prod(v.aval.shape)) for v in jaxpr.jaxpr.outvars]
    assert sum(out_sizes) == sum(int(np.prod(np.shape(l))) for l in jax.tree.leaves(trainable))
    assert n_frozen > sum(out_sizes)
