"""Sharding on 8 fake CPU devices: logical rules, QTensor splits, and equality with one device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests.conftest import run_seed

import qlora_jax as qj
from qlora_jax import sharding

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


MESHES = [(2, 2, 2), (1, 8, 1), (1, 2, 4), (8, 1, 1)]


@pytest.fixture(scope="module")
def mesh_results():
    seed = run_seed() % (1 << 20)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["x".join(map(str, m)) for m in MESHES]
    out = subprocess.run([sys.executable, os.path.join(HERE, "mesh_forward.py"), *args, str(seed)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(l) for l in out.stdout.strip().splitlines() if l.startswith("{")]
    return {tuple(r["mesh"]): r for r in lines}, seed


@pytest.mark.slow  # the subprocess of mesh_results runs 4 meshes on 8 fake devices
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_loss_and_grads_equal_one_device(mesh, mesh_results):
    results, seed = mesh_results
    res = results[mesh]
    assert res["devices"] == 8
    assert res["loss_rel"] < 1e-5, (res, seed)
    assert res["grad_rel"] < 1e-4, (res, seed)
    if mesh[1] * mesh[2] > 1:
        # 4-bit codes and their scales are split the same way, over fsdp x tensor.
        assert res["packed_spec"] == res["absmax_spec"], res
        assert res["packed_shards"] == mesh[1] * mesh[2], res


def _flat(tree):
    return traverse_util.flatten_dict(tree, is_leaf=lambda _, v: isinstance(v, qj.quant.QTensor))


def test_llama_declares_the_axes_of_every_parameter():
    cfg = qj.models.llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, qkv_bias=True)
    model = qj.models.llama.LlamaForCausalLM(cfg, lora=qj.LoraConfig(target_modules="all-linear"),
                                             quant=qj.QuantConfig(), impl="xla")
    params = model.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]
    axes = _flat(model.param_axes())
    # The params are plain arrays (no metadata boxes), and every one of them has its axes.
    assert set(axes) == set(_flat(params))
    assert all(isinstance(v, (jax.Array, qj.quant.QTensor)) for v in _flat(params).values())
    io = {"q_proj": ("embed", "heads"), "k_proj": ("embed", "kv"), "v_proj": ("embed", "kv"),
          "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"),
          "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed")}
    expected = {("model", "embed_tokens", "embedding"): ("vocab", "embed"),
                ("model", "norm", "scale"): ("norm",), ("lm_head", "kernel"): ("embed", "vocab")}
    for n in ("input_layernorm", "post_attention_layernorm"):
        expected[("model", "layers", n, "scale")] = ("layers", "norm")
    for n, (i, o) in io.items():
        base = ("model", "layers", "mlp" if n in ("gate_proj", "up_proj", "down_proj")
                else "self_attn", n)
        expected[base + ("kernel",)] = ("layers", i, o)
        expected[base + ("lora_a",)] = ("layers", i, "rank")   # A: (in, rank), as its kernel
        expected[base + ("lora_b",)] = ("layers", "rank", o)   # B: (rank, out)
        if n in ("q_proj", "k_proj", "v_proj"):
            expected[base + ("bias",)] = ("layers", o)
    assert axes == expected

    # The 4-bit kernel's codes and scales lie on its stack axis and the block axis.
    logical = _flat(sharding.logical_axes(params, model.param_axes()))
    q = logical[("model", "layers", "self_attn", "o_proj", "kernel")]
    assert q.packed == ("layers", "qblocks") and q.absmax == ("layers", "qblocks")
    assert logical[("model", "layers", "self_attn", "o_proj", "lora_a")] == (
        "layers", "heads", "rank")


def test_bert_declares_its_axes_and_output_dense_is_mlp_to_embed():
    cfg = qj.models.bert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64,
                                    max_position_embeddings=16)
    model = qj.models.bert.BertModel(cfg, num_labels=3,
                                     lora=qj.LoraConfig(target_modules=["dense", "query"]))
    params = model.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]
    axes = _flat(model.param_axes())
    assert set(axes) == set(_flat(params))
    layer = ("encoder", "layer")
    assert axes[layer + ("output", "dense", "kernel")] == ("layers", "mlp", "embed")  # [F, D]
    assert axes[layer + ("output", "dense", "bias")] == ("layers", "embed")
    assert axes[layer + ("output", "dense", "lora_a")] == ("layers", "mlp", "rank")
    assert axes[layer + ("output", "dense", "lora_b")] == ("layers", "rank", "embed")
    assert axes[layer + ("intermediate", "dense", "kernel")] == ("layers", "embed", "mlp")
    assert axes[layer + ("attention", "output", "dense", "kernel")] == (
        "layers", "heads", "embed")
    assert axes[layer + ("attention", "self", "query", "lora_b")] == ("layers", "rank", "heads")
    assert axes[layer + ("output", "LayerNorm", "scale")] == ("layers", "norm")
    assert axes[("embeddings", "word_embeddings", "embedding")] == ("vocab", "embed")
    assert axes[("embeddings", "position_embeddings", "embedding")] == (None, "embed")
    assert axes[("classifier", "kernel")] == ("embed", None)


def test_a_tree_of_another_model_is_refused():
    cfg = qj.models.llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, head_dim=16)
    model = qj.models.llama.LlamaForCausalLM(cfg)
    params = {"encoder": {"dense": {"kernel": np.zeros((4, 4), np.float32)}}}
    with pytest.raises(ValueError, match="encoder/dense/kernel is not one of the model's"):
        sharding.logical_axes(params, model.param_axes())


def test_mesh_size_mismatch_is_explained():
    with pytest.raises(ValueError, match="does not match the 1 available devices"):
        sharding.make_mesh(2, 1, 1)


def test_unknown_mesh_axis_in_rules():
    class M:
        rules = [["batch", ["data", "pipeline"]]]
    with pytest.raises(ValueError, match="unknown mesh axis 'pipeline'"):
        sharding.rules_from_config(M())


def test_tensor_major_code_split_is_refused():
    class M:
        rules = [["qblocks", ["tensor", "fsdp"]]]
    with pytest.raises(ValueError, match="tensor before fsdp gives wrong updates"):
        sharding.rules_from_config(M())

    class Ok:
        rules = [["qblocks", ["fsdp", "tensor"]], ["batch", ["data", "fsdp"]]]
    assert dict(sharding.rules_from_config(Ok()))["qblocks"] == ("fsdp", "tensor")


@pytest.mark.slow  # train steps on 3 meshes in a subprocess
def test_train_steps_on_meshes_give_the_one_device_losses():
    seed = run_seed() % (1 << 20)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(HERE, "mesh_train.py"), "2x2x2", "1x8x1",
                          str(seed)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ref = np.asarray(res["one_device"])
    assert ref[-1] < ref[0], res  # it trains
    for mesh in ("2x2x2", "1x8x1"):
        got = np.asarray(res[mesh])
        np.testing.assert_allclose(got, ref, rtol=1e-3, err_msg=f"mesh {mesh}, seed {seed}")
    assert res["spec_2x2x2"] != "PartitionSpec()", res
