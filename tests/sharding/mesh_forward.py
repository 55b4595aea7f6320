"""Run in a subprocess with 8 fake CPU devices: sharded forward/backward equal the one-device ones.

Prints one JSON line with the measured relative errors and the specs that were chosen.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import qlora_jax as qj  # noqa: E402
from qlora_jax import sharding  # noqa: E402
from qlora_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402


def main(meshes: list[tuple[int, int, int]], seed: int) -> None:
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg, lora=qj.LoraConfig(r=8, target_modules="all-linear",
                                                     init="random"),
                             quant=qj.QuantConfig(), impl="xla")
    ids = jax.random.randint(jax.random.key(seed), (8, 16), 0, cfg.vocab_size)
    params = model.init(jax.random.key(seed + 1), ids)["params"]
    trainable, frozen = qj.lora.partition(params)

    def loss(t, f, x):
        logits = model.apply({"params": qj.lora.combine(t, f)}, x).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, x[..., None], -1)[..., 0])

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(loss))(trainable, frozen, ids)
    for data, fsdp, tensor in meshes:
        print(json.dumps(dict(mesh=[data, fsdp, tensor], **one_mesh(
            loss, trainable, frozen, model.param_axes(), ids, ref_loss, ref_grad, data, fsdp,
            tensor))))


def one_mesh(loss, trainable, frozen, axes, ids, ref_loss, ref_grad, data, fsdp, tensor):
    mesh = sharding.make_mesh(data, fsdp, tensor)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        t_s = sharding.shard_params(trainable, axes, mesh)
        f_s = sharding.shard_params(frozen, axes, mesh)
        x_s = sharding.shard_batch({"ids": np.asarray(ids)}, mesh)["ids"]
        out_sh = (sharding.replicated(mesh), sharding.param_shardings(trainable, axes, mesh))
        step = jax.jit(jax.value_and_grad(loss), out_shardings=out_sh)
        got_loss, got_grad = step(t_s, f_s, x_s)
    q = f_s["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    gerr = max(float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))
               for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)))
    return {
        "loss_rel": abs(float(got_loss) - float(ref_loss)) / abs(float(ref_loss)),
        "grad_rel": gerr,
        "devices": len(jax.devices()),
        "packed_spec": str(q.packed.sharding.spec),
        "absmax_spec": str(q.absmax.sharding.spec),
        "packed_shards": len({str(s.index) for s in q.packed.addressable_shards}),
        "q_kernel_a_spec": str(t_s["model"]["layers"]["self_attn"]["q_proj"]["lora_a"].sharding.spec),
        "batch_spec": str(x_s.sharding.spec),
    }


if __name__ == "__main__":
    specs = [tuple(int(v) for v in a.split("x")) for a in sys.argv[1:-1]]
    main(specs, int(sys.argv[-1]))
