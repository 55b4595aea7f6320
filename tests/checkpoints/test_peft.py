"""PEFT adapters both ways: PEFT's files load here with PEFT's outputs, ours load in PEFT with ours."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from tests.models import tiny

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _apply(model, params, *args):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *map(jnp.asarray, args))


def _torch_out(model, ids, mask):
    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2_tied"])
def test_peft_adapter_loads_here_with_peft_logits(llama_ckpt, variant, tmp_path, rng):
    path, _ = llama_ckpt(variant)
    torch.manual_seed(int(rng.integers(1 << 30)))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                          init_lora_weights=False, rank_pattern={"down_proj": 2},
                          alpha_pattern={"o_proj": 3}, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base, cfg).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids, mask = tiny.left_padded(rng, 2, 9)
    want = _torch_out(pm, ids, mask)
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    model, params = qj.load_peft(model, params, str(tmp_path / "adapter"))
    assert model.lora.use_rslora and model.lora.r == 4 and model.lora.alpha == 16
    assert params["model"]["layers"]["mlp"]["down_proj"]["lora_a"].shape[-1] == 2
    err = tiny.rel_err(_apply(model, params, ids, mask), want, mask)
    assert err < 1e-4, err


def test_our_adapter_loads_in_peft_with_our_logits(llama_ckpt, tmp_path, rng):
    path, _ = llama_ckpt("llama3_rope")
    lora = qj.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                         init="random", modules_to_save=("lm_head",))
    model, params = qj.from_pretrained(path, dtype=jnp.float32, lora=lora,
                                       seed=int(rng.integers(1 << 30)))
    # A trained head: perturb the modules_to_save weight so saving it matters.
    head = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = head.replace(value=head.value * 1.5)
    ids, mask = tiny.left_padded(rng, 3, 8)
    ours = _apply(model, params, ids, mask)
    out = str(tmp_path / "ours")
    qj.save_peft(model, params, out, base_model_name_or_path=path)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    for field in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                  "bias", "use_rslora", "use_dora", "fan_in_fan_out", "modules_to_save",
                  "rank_pattern", "alpha_pattern", "init_lora_weights",
                  "base_model_name_or_path", "inference_mode", "layers_to_transform",
                  "layers_pattern"):
        assert field in cfg, field
    assert cfg["task_type"] == "CAUSAL_LM"
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    assert tiny.rel_err(ours, _torch_out(pm, ids, mask), mask) < 1e-4
    # And back here: the same adapters and head.
    m2, p2 = qj.load_peft(*qj.from_pretrained(path, dtype=jnp.float32), out)
    assert tiny.rel_err(_apply(m2, p2, ids, mask), ours, mask) < 1e-6
    assert isinstance(p2["lm_head"]["kernel"], qj.lora.Trainable)


def test_bert_classifier_adapter_both_ways(tmp_path, rng):
    src = str(tmp_path / "src")
    tiny.write_bert(src, "bert", int(rng.integers(1 << 30)), num_labels=3)
    ids = rng.integers(2, 120, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[0, 4:] = 0
    torch.manual_seed(int(rng.integers(1 << 30)))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(src)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                   init_lora_weights=False,
                                                   task_type="SEQ_CLS")).eval()
    with torch.no_grad():  # a trained head
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(2.0)
    pm.save_pretrained(str(tmp_path / "peft"))
    want = _torch_out(pm, ids, mask)
    model, params = qj.from_pretrained(src, dtype=jnp.float32, num_labels=3)
    model, params = qj.load_peft(model, params, str(tmp_path / "peft"))
    assert model.lora.modules_to_save == ("classifier",)
    assert tiny.rel_err(_apply(model, params, ids, mask), want) < 1e-4
    qj.save_peft(model, params, str(tmp_path / "back"))
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(src)
    again = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "back")).eval()
    assert tiny.rel_err(_torch_out(again, ids, mask), want) < 1e-4


def test_adapter_for_another_base_names_tensor_and_shapes(llama_ckpt, tmp_path):
    path, _ = llama_ckpt("llama_gqa")
    other = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=tiny.VOCAB)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(other),
                             peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "other"))
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*\[4, 32\].*\[4, 64\]"):
        qj.load_peft(model, params, str(tmp_path / "other"))


def test_missing_adapter_files_are_named(llama_ckpt, tmp_path):
    path, _ = llama_ckpt("llama_gqa")
    model, params = qj.from_pretrained(path, dtype=jnp.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        qj.load_peft(model, params, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no LoRA"):
        qj.save_peft(model, params, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_qlora_adapter_on_a_bitsandbytes_base_loads_with_peft_logits(llama_ckpt, tmp_path, rng):
    path, _ = llama_ckpt("llama_gqa")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb, device_map="cpu", dtype=torch.float32).train()
    base.save_pretrained(str(tmp_path / "q4"))
    torch.manual_seed(int(rng.integers(1 << 30)))
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False,
                                                   task_type="CAUSAL_LM")).train()
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids, mask = tiny.left_padded(rng, 2, 8)
    want = _torch_out(pm, ids, mask)
    model, params = qj.from_pretrained(str(tmp_path / "q4"), dtype=jnp.float32)
    model, params = qj.load_peft(model, params, str(tmp_path / "adapter"))
    assert isinstance(params["model"]["layers"]["mlp"]["up_proj"]["kernel"], qj.quant.QTensor)
    assert tiny.rel_err(_apply(model, params, ids, mask), want, mask) < 1e-4
