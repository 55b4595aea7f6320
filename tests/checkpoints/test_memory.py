"""Quantize-on-load keeps peak host memory near the quantized model plus one tensor.

A float32 checkpoint more than three times the memory budget is loaded with
NF4 quantization in a fresh process; the peak resident set growth (VmHWM,
reset after a warm-up load that compiles the kernels) must stay within
``quantized params + 8 x the largest float32 tensor`` (reading, casting and
quantizing one tensor needs a few temporaries of its size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qlora_jax.checkpoints.safetensors_io import write_safetensors

D, F, V = 1024, 2816, 1000


def _write(directory: str, layers: int, rng: np.random.Generator) -> int:
    os.makedirs(directory, exist_ok=True)
    cfg = dict(model_type="llama", hidden_size=D, intermediate_size=F, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=8, vocab_size=V, rms_norm_eps=1e-6,
               max_position_embeddings=128, tie_word_embeddings=False)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)

    def rnd(shape):
        return lambda: rng.standard_normal(shape, dtype=np.float32) * 0.02

    def ones():
        return np.ones(D, np.float32)

    specs = [("model.embed_tokens.weight", np.float32, (V, D), rnd((V, D)))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{n}_proj.weight", np.float32, (D, D), rnd((D, D)))
                  for n in "qkvo"]
        specs += [(p + f"mlp.{n}_proj.weight", np.float32, (F, D), rnd((F, D)))
                  for n in ("gate", "up")]
        specs += [(p + "mlp.down_proj.weight", np.float32, (D, F), rnd((D, F))),
                  (p + "input_layernorm.weight", np.float32, (D,), ones),
                  (p + "post_attention_layernorm.weight", np.float32, (D,), ones)]
    specs += [("model.norm.weight", np.float32, (D,), ones),
              ("lm_head.weight", np.float32, (V, D), rnd((V, D)))]
    return write_safetensors(os.path.join(directory, "model.safetensors"), specs)


def _probe(big, warm) -> dict:
    """The memory probe's statistics for loading ``big`` after ``warm`` (own process)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "tests.checkpoints._memory_probe", str(big),
                           str(warm)], capture_output=True, text=True, cwd=root, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("cannot reset the peak RSS counter here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_gguf(path: str, layers: int, rng: np.random.Generator) -> int:
    """The same model as ``_write``, as a float32 llama GGUF (tensors produced one at a time)."""
    import gguf

    from qlora_jax.formats.gguf import gguf_name, write_gguf
    T = gguf.GGUFValueType
    meta = [("llama.block_count", layers, T.UINT32, None),
            ("llama.embedding_length", D, T.UINT32, None),
            ("llama.feed_forward_length", F, T.UINT32, None),
            ("llama.attention.head_count", 8, T.UINT32, None),
            ("llama.vocab_size", V, T.UINT32, None),
            ("llama.context_length", 128, T.UINT32, None)]
    shapes = [("model.embed_tokens.weight", (V, D))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (D, D)) for n in "qkvo"]
        shapes += [(p + f"mlp.{n}_proj.weight", (F, D)) for n in ("gate", "up")]
        shapes += [(p + "mlp.down_proj.weight", (D, F)), (p + "input_layernorm.weight", (D,)),
                   (p + "post_attention_layernorm.weight", (D,))]
    shapes += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    tensors = [(gguf_name(k), s, "F32",
                (lambda s=s: rng.standard_normal(s, dtype=np.float32) * 0.02) if len(s) == 2
                else (lambda: np.ones(D, np.float32))) for k, s in shapes]
    write_gguf(path, "llama", meta, tensors)
    return os.path.getsize(path)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_quantize_on_load_peak_memory_stays_under_budget(tmp_path, rng, fmt):
    """Loading a 12-layer float checkpoint (safetensors directory or llama GGUF) with NF4
    quantization grows the process by less than the quantized params plus 8 float tensors."""
    write, name = (_write, "{}") if fmt == "safetensors" else (_write_gguf, "{}.gguf")
    big = write(str(tmp_path / name.format("big")), 12, rng)
    write(str(tmp_path / name.format("warm")), 1, rng)
    stats = _probe(tmp_path / name.format("big"), tmp_path / name.format("warm"))
    budget = stats["params_bytes"] + 8 * F * D * 4
    print(f"{fmt} {big / 1e6:.0f} MB, quantized params {stats['params_bytes'] / 1e6:.1f} MB, "
          f"peak growth {stats['peak_growth'] / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB")
    assert big > 3 * budget  # the float checkpoint could never fit the budget
    assert stats["peak_growth"] < budget
