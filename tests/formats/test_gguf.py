"""GGUF reading on synthetic files: every decodable type, names, q/k permutation, config.

Oracle: transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``) on the same file.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.formats import gguf as qgguf
from tests.formats.tiny_gguf import tiny_llama, transformers_gguf_logits, write_tiny_gguf
from tests.models.tiny import rel_err

K_SHAPE = dict(hidden=256, intermediate=512)  # K-quant rows hold multiples of 256 values


def _compare(tmp_path, rng, weight_type: str, **shape) -> None:
    model = tiny_llama(int(rng.integers(1 << 30)), **shape)
    path = write_tiny_gguf(str(tmp_path / f"{weight_type}.gguf"), model, weight_type,
                           seed=int(rng.integers(1 << 30)))
    ids = rng.integers(0, model.config.vocab_size, size=(2, 9))
    ref = transformers_gguf_logits(path, ids)
    ours, params = qj.from_pretrained(path, dtype=jnp.float32)
    out = ours.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert rel_err(out, ref) < 1e-4, weight_type
    assert ("lm_head" in params) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("weight_type,shape", [("F32", {}), ("Q8_0", {}), ("Q4_K", K_SHAPE)])
def test_logits_equal_transformers(tmp_path, rng, weight_type, shape):
    _compare(tmp_path, rng, weight_type, **shape)


@pytest.mark.slow
@pytest.mark.parametrize("weight_type,shape", [
    ("F16", {}), ("BF16", {}), ("Q4_0", {}), ("Q5_1", {}), ("Q6_K", K_SHAPE)])
def test_logits_equal_transformers_more_types(tmp_path, rng, weight_type, shape):
    _compare(tmp_path, rng, weight_type, **shape)


def test_tied_embeddings_and_config(tmp_path, rng):
    model = tiny_llama(int(rng.integers(1 << 30)), tied=True, kv_heads=4)
    path = write_tiny_gguf(str(tmp_path / "tied.gguf"), model, "F16")
    reader = qgguf.open_reader(path)
    cfg = qgguf.hf_config(reader, path)
    hf = model.config
    assert cfg["tie_word_embeddings"] is True
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"]


def test_permutation_roundtrip_and_matches_transformers(rng):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of dim 8
    permuted = qgguf.permute_qk(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(qgguf.unpermute_qk(permuted, 3), w)
    ref = LlamaTensorProcessor()._reverse_permute_weights(permuted, 3, 3)
    np.testing.assert_array_equal(qgguf.unpermute_qk(permuted, 3), ref)


def test_names_roundtrip():
    for name in ("token_embd.weight", "output_norm.weight", "output.weight",
                 "blk.7.attn_q.weight", "blk.0.attn_k.bias", "blk.12.ffn_down.weight",
                 "blk.3.attn_norm.weight", "blk.3.ffn_norm.weight"):
        assert qgguf.gguf_name(qgguf.hf_name(name)) == name
    assert qgguf.hf_name("blk.2.attn_output.weight") == "model.layers.2.self_attn.o_proj.weight"
    assert qgguf.hf_name("rope_freqs.weight") is None


def test_llama3_rope_recovered_from_rope_freqs():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    import transformers
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
              "rope_theta": 500000.0}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=params)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    factors = qgguf.llama3_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(base / factors, inv.numpy(), rtol=1e-5)


def test_truncated_file_named(tmp_path, rng):
    path = write_tiny_gguf(str(tmp_path / "t.gguf"), tiny_llama(int(rng.integers(1 << 30))))
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(ValueError, match=r"t\.gguf.*(truncated|not a readable GGUF)"):
        qj.from_pretrained(path)


def test_unsupported_architecture_and_missing(tmp_path):
    import gguf
    path = str(tmp_path / "phi.gguf")
    w = gguf.GGUFWriter(path, "phi2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'phi2' is not supported"):
        qj.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        qj.from_pretrained(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        qj.from_pretrained(str(bad))
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        os.link(path, two / n)
    with pytest.raises(ValueError, match="2 .gguf files"):
        qj.from_pretrained(str(two))


def _assert_header_equals_gguf_reader(path: str) -> None:
    import gguf
    ours, ref = qgguf.open_reader(path), gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.keys() == want.keys()
    for key, value in want.items():
        assert ours.fields[key] == pytest.approx(value) if isinstance(value, float) else \
            ours.fields[key] == value, key
    assert [(t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.n_bytes),
             int(t.data_offset)) for t in ref.tensors] == [tuple(t) for t in ours.tensors]
    for t, u in list(zip(ref.tensors, ours.tensors))[:12]:
        np.testing.assert_array_equal(ours.read(u), np.asarray(t.data))


def test_header_parse_equals_gguf_reader(tmp_path, rng):
    model = tiny_llama(int(rng.integers(1 << 30)))
    tokens = [f"tok{i}" for i in range(model.config.vocab_size)]
    _assert_header_equals_gguf_reader(write_tiny_gguf(str(tmp_path / "h.gguf"), model, "Q8_0",
                                                      tokens=tokens))


@pytest.mark.slow
def test_header_parse_equals_gguf_reader_smollm2(smollm2_gguf):
    _assert_header_equals_gguf_reader(smollm2_gguf)
