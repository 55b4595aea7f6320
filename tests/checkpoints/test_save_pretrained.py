"""save_pretrained: float directories (merged LoRA, sharded, tied, BERT heads) that transformers loads."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from tests.models import tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _apply(model, params, *args):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *map(jnp.asarray, args))


@pytest.mark.parametrize("variant", ["llama3_rope", "qwen2_tied"])
def test_merged_lora_save_loads_in_transformers(llama_ckpt, variant, tmp_path, rng):
    path, _ = llama_ckpt(variant)
    lora = qj.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random")
    model, params = qj.from_pretrained(path, dtype=jnp.float32, lora=lora,
                                       seed=int(rng.integers(1 << 30)))
    ids, mask = tiny.left_padded(rng, 2, 8)
    ours = _apply(model, params, ids, mask)
    out = str(tmp_path / "merged")
    qj.save_pretrained(model, params, out, dtype=jnp.float32, max_shard_size=40_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and len([f for f in files
                                                            if f.endswith(".safetensors")]) > 1
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = theirs(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    assert tiny.rel_err(ours, ref, mask) < 1e-4
    # Sharded directories read back here too.
    back, back_params = qj.from_pretrained(out, dtype=jnp.float32)
    assert tiny.rel_err(_apply(back, back_params, ids, mask), ref, mask) < 1e-4


def test_unmerged_save_writes_the_base_only(llama_ckpt, tmp_path, rng):
    path, ref_model = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32,
                                       lora=qj.LoraConfig(r=2, init="random"))
    out = str(tmp_path / "base")
    qj.save_pretrained(model, params, out, merge_lora=False, dtype=jnp.bfloat16)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["LlamaForCausalLM"]
    reader = qj.checkpoints.CheckpointReader(out)
    assert not any("lora" in k for k in reader)
    w = reader["model.layers.1.self_attn.q_proj.weight"]
    ref = ref_model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert w.dtype.name == "bfloat16"
    np.testing.assert_array_equal(w, ref.astype(w.dtype))


def test_bert_classifier_save_loads_in_transformers(tmp_path, rng):
    src = str(tmp_path / "src")
    tiny.write_bert(src, "bert", int(rng.integers(1 << 30)), num_labels=3)
    lora = qj.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=("classifier",),
                         init="random")
    model, params = qj.from_pretrained(src, dtype=jnp.float32, num_labels=3, lora=lora)
    ids = rng.integers(2, 120, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    ours = _apply(model, params, ids, mask)
    out = str(tmp_path / "out")
    qj.save_pretrained(model, params, out, dtype=jnp.float32)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        ref = theirs(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    assert tiny.rel_err(ours, ref) < 1e-4


def test_failed_save_leaves_existing_directory_untouched(llama_ckpt, tmp_path):
    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    broken = dict(params)
    broken.pop("lm_head")
    with pytest.raises(KeyError, match="lm_head"):
        qj.save_pretrained(model, broken, str(out))
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]
