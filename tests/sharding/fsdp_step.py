"""Run in a subprocess with 8 fake CPU devices: compile the QLoRA train step of a small Llama on
meshes (1,1,1), (8,1,1) and (1,8,1) through ``Placement`` and ``make_train_step`` (the training
loop's path) and report XLA's temp size, the collectives of the optimized HLO and one step's loss.

Usage: ``fsdp_step.py SEED [IMPL] [nohints]``. Prints one JSON line a mesh. ``nohints`` traces
the step without the mesh context (no activation hints, no per-use weight gathers): the state
before the FSDP fix, to check that the test fails on it.
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import qlora_jax as qj  # noqa: E402
from benchmarks.fsdp_probe import collectives  # noqa: E402
from qlora_jax import sharding  # noqa: E402
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from qlora_jax.train import distributed, state as tstate, step as tstep  # noqa: E402
from qlora_jax.train.task import Task  # noqa: E402

# B T D F L H G V: tokens B*T = 1024 > 2 V, so no weight is as large as half a hidden state.
B, T, D, F, L, H, G, V = 8, 128, 256, 768, 4, 4, 2, 256


def main(seed: int, impl: str) -> None:
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=G, head_dim=D // H,
                      max_position_embeddings=T)
    model = LlamaForCausalLM(cfg, lora=qj.LoraConfig(r=8, target_modules="all-linear",
                                                     init="random"),
                             quant=qj.QuantConfig(), impl=impl, remat="full",
                             dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.ones((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T + 1), dtype=np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "loss_mask": np.ones((B, T), np.float32)}
    task = Task(model, "causal_lm", loss_chunk=T // 2)
    tx = optax.adamw(1e-3)
    for mesh in ((1, 1, 1), (8, 1, 1), (1, 8, 1)):
        placement = distributed.Placement(
            sharding.make_mesh(*mesh, devices=jax.devices()[:int(np.prod(mesh))]),
            sharding.DEFAULT_RULES)
        state = tstate.create_state(jax.tree.map(jnp.copy, params), tx, seed)
        sh = placement.state_shardings(state, model.param_axes())
        state = placement.put(state, sh)
        step = tstep.make_train_step(task, tx, optax.constant_schedule(1e-3), dropout=False,
                                     shardings=placement.step_shardings(sh))
        b = placement.batch(batch)
        compiled = step.lower(state, b).compile()
        text = compiled.as_text()
        _, metrics = compiled(state, b)
        q = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
        # Copies of a whole stacked 4-bit array (e.g. into a transposed layout).
        stack_copies = re.findall(rf"= u8\[{L},\d+\]\S* copy\(", text)
        print(json.dumps(dict(
            mesh=list(mesh), impl=impl, temp=compiled.memory_analysis().temp_size_in_bytes,
            loss=float(metrics["loss"]), collectives=collectives(text),
            layer_packed=[int(np.prod(x["kernel"].packed.shape[1:]))
                          for g in ("self_attn", "mlp")
                          for x in params["model"]["layers"][g].values()],
            stack_copies=len(stack_copies),
            tokens=B * T, hidden=D, stack=int(q.packed.shape[0]))), flush=True)


if __name__ == "__main__":
    if "nohints" in sys.argv[3:]:
        sharding.in_mesh = lambda jitted, mesh, rules=None: jitted
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "xla")
