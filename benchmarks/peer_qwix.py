"""Peer: google's qwix LoRA provider with NF4 weights on a Flax Linen Llama.

The fastest JAX QLoRA setup we know of: qwix quantizes each projection's weight to NF4 (uint4
codes with a bf16 scale per tile of 64, no double quantization) and adds rank-R adapters by
intercepting the Dense calls. Same shape, batch, rank and remat as ``benchmarks.train_step``;
every decoder projection adapted (not the head); optax AdamW on the adapters only; cuDNN attention
on GPU. Needs qwix (carried as a wheel to the GPU machine).
"""

from __future__ import annotations

import time
from typing import Any


def _model(shape: Any):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    bf16 = jnp.bfloat16

    def proj(n: int, name: str) -> nn.Dense:
        return nn.Dense(n, use_bias=False, dtype=bf16, param_dtype=bf16, name=name)

    def rotate(x, pos):
        half = x.shape[-1] // 2
        inv = 500000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
        ang = pos[:, None].astype(jnp.float32) * inv
        c, s = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
        a, b = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
        return jnp.concatenate([a * c - b * s, b * c + a * s], -1).astype(x.dtype)

    class Norm(nn.Module):
        @nn.compact
        def __call__(self, x):
            g = self.param("scale", nn.initializers.ones, (x.shape[-1],), bf16)
            x32 = x.astype(jnp.float32)
            return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)
                    ).astype(bf16) * g

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, pos):
            b, t, d = x.shape
            k = d // shape.heads
            attn_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
            h = Norm(name="input_layernorm")(x)
            q = rotate(proj(shape.heads * k, "q_proj")(h).reshape(b, t, shape.heads, k), pos)
            kk = rotate(proj(shape.kv_heads * k, "k_proj")(h).reshape(b, t, shape.kv_heads, k), pos)
            v = proj(shape.kv_heads * k, "v_proj")(h).reshape(b, t, shape.kv_heads, k)
            o = jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation=attn_impl)
            x = x + proj(d, "o_proj")(o.reshape(b, t, d))
            h = Norm(name="post_attention_layernorm")(x)
            up = jax.nn.silu(proj(shape.inter, "gate_proj")(h)) * proj(shape.inter, "up_proj")(h)
            return x + proj(d, "down_proj")(up)

    class Llama(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(shape.vocab, shape.hidden, dtype=bf16, param_dtype=bf16,
                         name="embed_tokens")(ids)
            pos = jnp.arange(ids.shape[1])
            for i in range(shape.layers):
                x = nn.remat(Layer, prevent_cse=True)(name=f"layers_{i}")(x, pos)
            return proj(shape.vocab, "lm_head")(Norm(name="norm")(x))

    return Llama()


def _say(text: str) -> None:
    import sys
    print(f"[qwix peer {time.strftime('%X')}] {text}", file=sys.stderr, flush=True)


def _init_params(shape: Any, rules: Any, ids: Any) -> Any:
    """Params of the full model from a one-layer model initialised on the host.

    Initialising the whole 8B (or 70B) model on the host CPU takes many minutes (a bf16 draw of
    every weight, then qwix's NF4 quantization); on the device it would leave its own high-water
    mark in the peak we report. Every decoder layer gets its own copy of one random layer instead:
    the same tree, shapes and dtypes, the same work a step, at a fraction of the host time.
    """
    import dataclasses

    import jax
    import qwix

    one = qwix.apply_lora_to_model(_model(dataclasses.replace(shape, layers=1)),
                                   qwix.LoraProvider(rules))
    with jax.default_device(jax.devices("cpu")[0]):  # init on the host: the GPU peak is training
        small = jax.jit(one.init)(jax.random.key(0), ids)["params"]
        jax.block_until_ready(small)
    _say("one layer initialised on the host")
    params = {k: v for k, v in small.items() if k != "layers_0"}
    gpu = jax.devices()[0]
    params = jax.device_put(params, gpu)
    for i in range(shape.layers):
        params[f"layers_{i}"] = jax.device_put(small["layers_0"], gpu)
    return params


def run(shape: Any, batch: int, seq: int, r: int, steps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import qwix

    model = _model(shape)
    rules = [qwix.LoraRule(module_path=r"layers_\d+/.*_proj", weight_qtype="nf4",
                           tile_size=64, rank=r, alpha=16.0)]
    lm = qwix.apply_lora_to_model(model, qwix.LoraProvider(rules))
    ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, shape.vocab)
    t0 = time.perf_counter()
    params = _init_params(shape, rules, ids[:, :-1])
    jax.block_until_ready(params)
    build_s = time.perf_counter() - t0
    _say(f"params built in {build_s:.1f} s")
    is_lora = lambda path: "lora" in jax.tree_util.keystr(path)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree_util.tree_structure(params)
    lora_at = [is_lora(p) for p, _ in flat]
    trainable = [x for (_, x), m in zip(flat, lora_at) if m]
    frozen = [x for (_, x), m in zip(flat, lora_at) if not m]
    del params, flat
    tx = optax.adamw(2e-4)
    opt_state = tx.init(trainable)

    def join(t, f):
        it, jt = iter(t), iter(f)
        return jax.tree_util.tree_unflatten(treedef, [next(it) if m else next(jt)
                                                      for m in lora_at])

    def loss_fn(t, f, ids):
        logits = lm.apply({"params": join(t, f)}, ids[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    # The frozen weights are an argument: a closure would bake gigabytes of constants into
    # the program (as ../shared/peers/anchor_qwix.py, the script of the anchor figures, does).
    @jax.jit
    def step(t, s, f, ids):
        loss, g = jax.value_and_grad(loss_fn)(t, f, ids)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    t0 = time.perf_counter()
    trainable, opt_state, loss = step(trainable, opt_state, frozen, ids)
    loss0 = float(loss)
    compile_s = time.perf_counter() - t0
    _say(f"first step (compile) {compile_s:.1f} s, loss {loss0:.4f}")
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, frozen, ids)
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    stats = jax.devices()[0].memory_stats() or {}
    return dict(system="qwix-nf4-lora", remat="full", step_s=round(med, 4),
                tokens_per_s=round(batch * seq / med, 1), compile_s=round(compile_s, 1),
                build_s=round(build_s, 1),
                peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 3),
                loss_first=round(loss0, 4), loss_last=round(float(loss), 4),
                device=jax.devices()[0].device_kind, jax=jax.__version__,
                qwix=getattr(qwix, "__version__", "?"))
