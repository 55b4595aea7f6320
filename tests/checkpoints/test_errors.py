"""Bad input to from_pretrained (SPEC 6): named clearly, raised before reading weights, files untouched."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import pytest

import qlora_jax as qj
from qlora_jax.checkpoints import safetensors_io


@pytest.fixture
def ckpt(llama_ckpt, tmp_path):
    """A private copy of a tiny Llama checkpoint to break."""
    src, _ = llama_ckpt("llama_gqa")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def no_reads(monkeypatch):
    """Fails the test if any tensor data is read."""
    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read before the error")
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "get", refuse)


def _snapshot(d):
    return {p: (os.path.getsize(os.path.join(d, p)), os.path.getmtime(os.path.join(d, p)))
            for p in sorted(os.listdir(d))}


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found.*nowhere"):
        qj.from_pretrained(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        qj.from_pretrained(str(tmp_path))


def test_truncated_safetensors_names_the_file(ckpt, no_reads):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    before = _snapshot(ckpt)
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or corrupt.*truncated"):
        qj.from_pretrained(str(ckpt), quant=qj.QuantConfig())
    assert _snapshot(ckpt) == before


def test_corrupt_header_names_the_file(ckpt, no_reads):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or corrupt.*JSON"):
        qj.from_pretrained(str(ckpt))


def test_missing_safetensors(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        qj.from_pretrained(str(ckpt))


def test_unsupported_family_is_named_with_the_supported_ones(ckpt, no_reads):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'gpt2'.*bert.*llama.*mistral.*qwen2"):
        qj.from_pretrained(str(ckpt))


def test_shape_disagreeing_with_config_names_tensor_and_shapes(ckpt, no_reads):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError,
                       match=r"'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape "
                             r"\[\d+, \d+\], but config\.json implies \[\d+, \d+\]"):
        qj.from_pretrained(str(ckpt), quant=qj.QuantConfig())


def test_missing_tensor_is_named(ckpt, no_reads):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match=r"model\.layers\.2\."):
        qj.from_pretrained(str(ckpt))


def test_targets_matching_nothing_are_named(ckpt, no_reads):
    with pytest.raises(ValueError, match=r"'qproj'.*q_proj"):
        qj.from_pretrained(str(ckpt), lora=qj.LoraConfig(target_modules=["qproj", "v_proj"]))


def test_loading_changes_no_file(ckpt):
    before = _snapshot(ckpt)
    qj.from_pretrained(str(ckpt), dtype=jnp.float32, quant=qj.QuantConfig(),
                       lora=qj.LoraConfig(r=2))
    assert _snapshot(ckpt) == before
