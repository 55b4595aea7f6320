"""Run in a subprocess with 8 fake CPU devices: train steps on a mesh give the one-device losses.

Prints one JSON line: the per-step losses of the one-device run and of each mesh.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import qlora_jax as qj  # noqa: E402
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from qlora_jax.train import distributed, state as tstate, step as tstep  # noqa: E402
from qlora_jax.train.task import Task  # noqa: E402


def run(meshes, seed, steps=4):
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg, lora=qj.LoraConfig(r=8, target_modules="all-linear"),
                             quant=qj.QuantConfig(), impl="xla")
    params = jax.jit(model.init)(jax.random.key(seed), jnp.ones((1, 8), jnp.int32))["params"]
    task = Task(model, "causal_lm")
    tx = optax.adamw(1e-2)
    fn = tstep.train_step_fn(task, tx, optax.constant_schedule(1e-2), dropout=False)
    rng = np.random.default_rng(seed)
    # One batch, repeated: the model memorises it, so the loss must fall step after step.
    ids = rng.integers(0, cfg.vocab_size, (8, 17), dtype=np.int32)
    batches = [{"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                "loss_mask": np.ones((8, 16), np.float32)}] * steps

    def losses(placement):
        fresh = jax.tree.map(jnp.copy, params)  # the step donates its state
        state = tstate.create_state(fresh, tx, seed)
        step = jax.jit(fn, donate_argnums=0)
        if placement is not None:
            sh = placement.state_shardings(state, model.param_axes())
            state = placement.put(state, sh)
            step = jax.jit(fn, donate_argnums=0, out_shardings=(sh, placement.replicated()))
        out = []
        for b in batches:
            b = placement.batch(b) if placement is not None else b
            state, m = step(state, b)
            out.append(float(m["loss"]))
        spec = None
        if placement is not None:
            q = state.frozen["model"]["layers"]["mlp"]["up_proj"]["kernel"]
            spec = str(q.packed.sharding.spec)
        return out, spec

    result = {"one_device": losses(None)[0]}
    for m in meshes:
        mc = ml_collections.ConfigDict(dict(data=m[0], fsdp=m[1], tensor=m[2]))
        result["x".join(map(str, m))], result["spec_" + "x".join(map(str, m))] = losses(
            distributed.Placement.from_config(mc))
    print(json.dumps(result))


if __name__ == "__main__":
    run([tuple(int(v) for v in a.split("x")) for a in sys.argv[1:-1]], int(sys.argv[-1]))
