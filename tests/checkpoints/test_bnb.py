"""bitsandbytes 4-bit checkpoints: quantize-on-load bytes, reading transformers' 4-bit
directories without re-quantizing, and writing ones that transformers reads back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.checkpoints import CheckpointReader
from qlora_jax.checkpoints.hf_save import layer_of
from qlora_jax.quant import codebooks
from qlora_jax.quant.blockwise import dequantize_absmax
from tests.models import tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LINEARS = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
          [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
DYN = np.asarray(codebooks.DYNAMIC_MAP, np.float64)
DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}


def _bnb_model(path, torch_dtype):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch_dtype)
    m = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                          device_map="cpu", dtype=torch_dtype)
    return m.train()  # train mode: no CPU repacking of weight.data (formats.md)


def _logits(torch_model, ids, mask):
    with torch.no_grad():
        return torch_model(torch.as_tensor(ids),
                           attention_mask=torch.as_tensor(mask)).logits.float().numpy()


def _apply(model, params, ids, mask):
    return jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))


@pytest.fixture(scope="module")
def bnb_dirs(llama_ckpt, tmp_path_factory):
    """{dtype name: (float dir, transformers 4-bit model, dir it saved)}."""
    path, _ = llama_ckpt("llama_gqa")
    out = {}
    for name, (tdt, _) in DTYPES.items():
        qm = _bnb_model(path, tdt)
        saved = str(tmp_path_factory.mktemp(f"bnb_{name}"))
        qm.save_pretrained(saved)
        out[name] = (path, qm, saved)
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quantize_on_load_gives_bitsandbytes_bytes(bnb_dirs, dtype, rng):
    path, qm, saved = bnb_dirs[dtype]
    model, params = qj.from_pretrained(path, dtype=DTYPES[dtype][1], quant=qj.QuantConfig())
    reader = CheckpointReader(saved)
    layers = model.config.num_hidden_layers
    equal, w_err = [], 0.0
    for group, name in LINEARS:
        q = params["model"]["layers"][group][name]["kernel"]
        assert isinstance(q, qj.quant.QTensor) and q.dtype == DTYPES[dtype][1]
        for i in range(layers):
            key = f"model.layers.{i}.{group}.{name}.weight"
            ours = qj.quant.to_bnb_state_dict(layer_of(q, i), key)
            assert sorted(ours) == sorted(k for k in reader if k.startswith(key))
            np.testing.assert_array_equal(ours[key], reader[key], err_msg=key)
            # Double-quantized absmax: exact nearest here; bnb's CPU lookup table is off for a
            # few codes (formats.md): those may differ by one step of the dynamic map, or by
            # a few near its zero (codes 127 and 131 are 0 and 2.1e-5 of the nested absmax).
            a, b = ours[key + ".absmax"].astype(int), reader[key + ".absmax"].astype(int)
            near = (np.abs(a - b) <= 1) | (np.abs(DYN[a] - DYN[b]) <= 1e-4)
            assert np.all(near), (key, a[~near], b[~near])
            equal.append(a == b)
            np.testing.assert_allclose(ours[key + ".nested_absmax"],
                                       reader[key + ".nested_absmax"], rtol=1e-6)
            theirs = qj.quant.from_bnb_state_dict(reader, key)
            np.testing.assert_allclose(np.asarray(dequantize_absmax(layer_of(q, i))),
                                       np.asarray(dequantize_absmax(theirs)), rtol=2e-2)
            w_ours, w_theirs = (np.asarray(qj.quant.dequantize(t, jnp.float32))
                                for t in (layer_of(q, i), theirs))
            w_err = max(w_err, np.linalg.norm(w_ours - w_theirs) / np.linalg.norm(w_theirs))
    assert np.mean(np.concatenate(equal)) > 0.95
    assert w_err < 5e-3, w_err   # seen: <= 6.5e-4 (float32), 1.6e-3 (bfloat16)
    # lm_head is skipped by the default QuantConfig, as bitsandbytes does.
    assert not isinstance(params["lm_head"]["kernel"], qj.quant.QTensor)
    ids, mask = tiny.left_padded(rng, 2, 9)
    err = tiny.rel_err(_apply(model, params, ids, mask), _logits(qm, ids, mask), mask)
    # The logits differ as much as the weights do (the absmax codes bitsandbytes' CPU table
    # rounds differently, checked above): 0.3-4.8x the weights' relative error in 20 float32
    # draws, over a floor of ~7e-7; bfloat16 compute adds ~1.0-1.3e-2 whatever the weights.
    assert err < (1e-5 if dtype == "float32" else 2e-2) + 8 * w_err, (err, w_err)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_transformers_4bit_directory_loads_as_stored(bnb_dirs, dtype, rng):
    _, qm, saved = bnb_dirs[dtype]
    model, params = qj.from_pretrained(saved, dtype=DTYPES[dtype][1])
    assert model.quant is not None and model.quant.qtype == "nf4" and model.quant.double_quant
    reader = CheckpointReader(saved)
    q = params["model"]["layers"]["self_attn"]["k_proj"]["kernel"]
    for i in range(model.config.num_hidden_layers):
        key = f"model.layers.{i}.self_attn.k_proj.weight"
        ours = qj.quant.to_bnb_state_dict(layer_of(q, i), key)
        for k, v in ours.items():  # bit-identical to the file: nothing was re-quantized
            np.testing.assert_array_equal(v, reader[k], err_msg=k)
    ids, mask = tiny.left_padded(rng, 2, 9)
    err = tiny.rel_err(_apply(model, params, ids, mask), _logits(qm, ids, mask), mask)
    assert err < (1e-4 if dtype == "float32" else 2e-2), err


def test_keep_quantized_save_loads_in_transformers_with_the_same_logits(bnb_dirs, tmp_path, rng):
    path, _, _ = bnb_dirs["float32"]
    model, params = qj.from_pretrained(path, dtype=jnp.float32, quant=qj.QuantConfig())
    out = str(tmp_path / "q4")
    qj.save_pretrained(model, params, out, keep_quantized=True, dtype=jnp.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu",
                                                               dtype=torch.float32).train()
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids, mask = tiny.left_padded(rng, 3, 8)
    err = tiny.rel_err(_apply(model, params, ids, mask), _logits(theirs, ids, mask), mask)
    assert err < 1e-4, err
    # And back: the written bytes load here unchanged.
    again, again_params = qj.from_pretrained(out, dtype=jnp.float32)
    a = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    b = again_params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keep_quantized_rejects_int4(llama_ckpt, tmp_path):
    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32,
                                       quant=qj.QuantConfig(qtype="int4"))
    with pytest.raises(ValueError, match="int4"):
        qj.save_pretrained(model, params, str(tmp_path / "x"), keep_quantized=True)
    assert not (tmp_path / "x").exists()


def test_minilm_4bit_directory_from_transformers_gives_its_hidden_states(minilm_dir, tmp_path,
                                                                         rng):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    # train() without dropout: eval mode would repack the 4-bit weights on some CPUs.
    theirs = transformers.AutoModel.from_pretrained(
        minilm_dir, quantization_config=cfg, device_map="cpu", dtype=torch.float32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    theirs.save_pretrained(str(tmp_path))
    ids = rng.integers(1000, 30000, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = theirs(torch.as_tensor(ids),
                      attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
    model, params = qj.from_pretrained(str(tmp_path), dtype=jnp.float32)
    assert isinstance(params["encoder"]["layer"]["output"]["dense"]["kernel"], qj.quant.QTensor)
    err = tiny.rel_err(_apply(model, params, ids, mask), want, mask)
    assert err < 1e-4, err
