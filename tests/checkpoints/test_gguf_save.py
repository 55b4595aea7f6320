"""``qj.save_pretrained(..., format="gguf")``: tiny random Llama-family models, merged LoRA, bad
input. Oracle: transformers' GGUF loader (and ours, for Llama-3 rope, which transformers' GGUF
loader does not read)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import qlora_jax as qj
from qlora_jax import data
from qlora_jax.lora.tree import flatten, unflatten
from tests.formats.tiny_gguf import tiny_byte_tokenizer
from tests.models.tiny import rel_err

torch = pytest.importorskip("torch")

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def _with_lora(path: str, rng: np.random.Generator):
    """(model, params) in float32 with rank-2 adapters on every linear layer, B non-zero."""
    model, params = qj.from_pretrained(path, dtype=jnp.float32,
                                       lora=qj.LoraConfig(r=2, alpha=4,
                                                          target_modules="all-linear"))
    flat = flatten(params)
    for k, v in flat.items():
        if k[-1] == "lora_b":
            flat[k] = jnp.asarray(0.05 * rng.standard_normal(v.shape), jnp.float32)
    return model, unflatten(flat)


def _f16_rounded(params: dict) -> dict:
    """2-D weights rounded to float16 as the F16 file stores them (norms and biases are F32)."""
    return unflatten({p: v.astype(jnp.float16).astype(jnp.float32)
                      if p[-1] in ("kernel", "embedding") else v
                      for p, v in flatten(params).items()})


def _q8_0_rounded(params: dict) -> dict:
    """Kernels and embeddings through gguf's Q8_0 round trip, along PyTorch rows ``[out, in]``."""
    import gguf
    q8 = gguf.GGMLQuantizationType.Q8_0

    def rt(a, rows_last):
        a = np.asarray(a, np.float32)
        a = np.swapaxes(a, -1, -2) if rows_last else a
        b = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(a), q8), q8)
        b = b.reshape(a.shape)
        return jnp.asarray(np.swapaxes(b, -1, -2) if rows_last else b)
    return unflatten({p: rt(v, p[-1] == "kernel") if p[-1] in ("kernel", "embedding") else v
                      for p, v in flatten(params).items()})


def _transformers_logits(path: str, ids: np.ndarray) -> np.ndarray:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    with torch.no_grad():
        return m(torch.as_tensor(ids)).logits.numpy()


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2_tied"])
def test_f16_roundtrip_through_transformers(llama_ckpt, tmp_path, rng, variant):
    model, params = _with_lora(llama_ckpt(variant)[0], rng)
    out = qj.save_pretrained(model, params, str(tmp_path / "m.gguf"), format="gguf",
                             tokenizer=tiny_byte_tokenizer(chat_template=TEMPLATE))
    ids = rng.integers(3, model.config.vocab_size, size=(2, 11))
    merged_model, merged = qj.lora.merge(model, params)
    want = merged_model.apply({"params": _f16_rounded(merged)}, jnp.asarray(ids, jnp.int32))
    got = _transformers_logits(out, ids)
    assert rel_err(got, want) < 1e-5  # the same float16 weights, both computed in float32
    back, back_params = qj.from_pretrained(out, dtype=jnp.float32)
    assert back.config.model_type == ("qwen2" if variant == "qwen2_tied" else "llama")
    assert rel_err(back.apply({"params": back_params}, jnp.asarray(ids, jnp.int32)), want) < 1e-5
    base = qj.save_pretrained(model, params, str(tmp_path / "base.gguf"), format="gguf",
                              merge_lora=False, tokenizer=tiny_byte_tokenizer())
    assert rel_err(_transformers_logits(base, ids), want) > 1e-2  # the adapter mattered


def test_q8_0_and_llama3_rope_roundtrip_through_ours(llama_ckpt, tmp_path, rng):
    model, params = _with_lora(llama_ckpt("llama3_rope")[0], rng)
    tok = tiny_byte_tokenizer(chat_template=TEMPLATE)
    ids = rng.integers(3, model.config.vocab_size, size=(2, 40))  # past original context 16
    merged_model, merged = qj.lora.merge(model, params)
    for gguf_type, stored in (("f32", merged), ("q8_0", _q8_0_rounded(merged))):
        out = qj.save_pretrained(model, params, str(tmp_path / f"{gguf_type}.gguf"),
                                 format="gguf", tokenizer=tok, gguf_type=gguf_type)
        back, back_params = qj.from_pretrained(out, dtype=jnp.float32)
        assert dict(back.config.rope_scaling) == dict(model.config.rope_scaling)
        want = merged_model.apply({"params": stored}, jnp.asarray(ids, jnp.int32))
        got = back.apply({"params": back_params}, jnp.asarray(ids, jnp.int32))
        assert rel_err(got, want) < 1e-6, gguf_type
    reread = data.load_tokenizer(out)
    for text in ("hello world 123", "<|im_start|>hi<|im_end|>", "  tabs\tand\nnewlines"):
        assert reread.encode(text) == tok.encode(text)
    assert reread.chat_template == TEMPLATE
    assert (reread.bos_id, reread.eos_id, reread.pad_id) == (1, 2, 0)


def test_bad_input(llama_ckpt, tmp_path, rng, monkeypatch):
    model, params = qj.from_pretrained(llama_ckpt("llama_gqa")[0], dtype=jnp.float32)
    tok = tiny_byte_tokenizer()
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="format='onnx' is not one of"):
        qj.save_pretrained(model, params, str(out), format="onnx")
    with pytest.raises(ValueError, match="gguf_type='q4_k' is not one of"):
        qj.save_pretrained(model, params, str(out), format="gguf", tokenizer=tok,
                           gguf_type="q4_k")
    with pytest.raises(ValueError, match="path ending in .gguf"):
        qj.save_pretrained(model, params, str(tmp_path / "dir"), format="gguf", tokenizer=tok)
    with pytest.raises(TypeError, match="needs the model's tokenizer"):
        qj.save_pretrained(model, params, str(out), format="gguf")
    with pytest.raises(ValueError, match="160 embedding rows"):
        qj.save_pretrained(model, params, str(out), format="gguf",
                           tokenizer=tiny_byte_tokenizer(vocab=200))
    with pytest.raises(ValueError, match="GGUF cannot hold"):
        qj.save_pretrained(model, params, str(out), format="gguf", tokenizer=tok,
                           keep_quantized=True)
    bert = qj.models.registry.build_model({"model_type": "bert", "vocab_size": 30,
                                           "hidden_size": 8, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "intermediate_size": 16})
    with pytest.raises(ValueError, match="writes Llama-family models"):
        qj.save_pretrained(bert, {}, str(out), format="gguf", tokenizer=tok)
    assert os.listdir(tmp_path) == []
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="never overwritten"):
        qj.save_pretrained(model, params, str(out), format="gguf", tokenizer=tok)
    assert out.read_bytes() == b"keep me"
    # A failure while writing tensors leaves no file behind.
    from qlora_jax.checkpoints import gguf_save
    calls = []

    def failing(a, kind):
        calls.append(kind)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return np.ascontiguousarray(a, np.float16 if kind == "F16" else np.float32)
    monkeypatch.setattr(gguf_save, "_encode", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        qj.save_pretrained(model, params, str(tmp_path / "new.gguf"), format="gguf",
                           tokenizer=tok)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
