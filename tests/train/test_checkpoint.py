"""Orbax checkpoints of a TrainState: exact round trip, placement, keep-K, unfinished saves."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qlora_jax as qj
from qlora_jax.lora import Trainable
from qlora_jax.train import optim
from qlora_jax.train.checkpoint import Checkpointer
from qlora_jax.train.state import create_state
from tests.train.toy_lm import ToyClassifier, box_saved, random_params


def make_state(rng, offload):
    lora = qj.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"])
    model = ToyClassifier(lora=lora)
    params = box_saved(model, random_params(model, rng))
    tx = optax.adamw(1e-3)
    state = create_state(params, tx, 7, offload_state=offload)
    # Non-trivial optimizer moments and adapters.
    noise = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)  # noqa: E731
    opt = jax.tree.map(lambda x: optim.to_memory(noise(x), "pinned_host") if offload
                       else noise(x), state.opt_state)
    return state.replace(step=jnp.asarray(5, jnp.int32), opt_state=opt,
                         trainable=jax.tree.map(noise, state.trainable)), params, tx


def leaves_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(tree))]


def test_round_trip_is_exact_and_keeps_placement(rng, tmp_path):
    for offload in (False, True):
        state, params, tx = make_state(rng, offload)
        ck = Checkpointer(str(tmp_path / f"ck{offload}"), keep=2)
        ck.save(state, {"epoch": 1, "index": 3})
        fresh = create_state(params, tx, 7, offload_state=offload)
        restored, data = ck.restore(fresh)
        ck.close()
        assert data == {"epoch": 1, "index": 3} and int(restored.step) == 5
        assert leaves_bytes(restored.trainable) == leaves_bytes(state.trainable)
        assert leaves_bytes(restored.opt_state) == leaves_bytes(state.opt_state)
        assert isinstance(restored.trainable["classifier"]["kernel"], Trainable)
        assert optim.memory_kinds(restored.opt_state) == ({"pinned_host"} if offload
                                                          else {"device"})
        assert jax.tree.structure(restored.opt_state) == jax.tree.structure(fresh.opt_state)


def test_keeps_the_last_k_and_ignores_unfinished_saves(rng, tmp_path):
    state, params, tx = make_state(rng, False)
    ck = Checkpointer(str(tmp_path), keep=2)
    for step in (2, 4, 6):
        ck.save(state.replace(step=jnp.asarray(step, jnp.int32)), {"index": step})
    assert ck.all_steps() == [4, 6]
    ck.close()
    # A save killed before orbax committed it: a temporary directory of a later step.
    (tmp_path / "8.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "8.orbax-checkpoint-tmp" / "junk").write_text("partial")
    ck = Checkpointer(str(tmp_path), keep=2)
    assert ck.latest_step() == 6
    _, data = ck.restore(create_state(params, tx, 7))
    assert data == {"index": 6}
    ck.close()
    assert "8" not in os.listdir(tmp_path)
