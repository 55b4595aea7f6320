"""The experiment configs: documented fields, launch commands, and the QLoRA recipe end to end.

The recipe test writes a tiny random Llama checkpoint (qj.save_pretrained) and a prompt/response
JSONL file, then runs experiments/llama_qlora.py on them for a few steps: NF4 + double quant base,
bf16 compute, r=64 adapters on all linear layers, remat "full", 2 micro-batches, optimizer state
in pinned host memory, chunked response-only loss.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax as qj
from qlora_jax.lora import params as lp
from qlora_jax.train import build, loop, optim
from qlora_jax.train.config import CHOICES, ConfigError, load_experiment, validate
from qlora_jax.train.defaults import default_config
from qlora_jax.train.task import Task
from tests.conftest import run_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments"))
                     if f.endswith(".py") and not f.startswith("_"))
TOKENIZER = os.path.join(ROOT, "experiments", "data", "smoke_tokenizer")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_docstring_holds_its_launch_command(name):
    doc = load(name).__doc__ or ""
    assert "python -m qlora_jax.launch --config" in doc and f"experiments/{name}.py" in doc
    assert "expected result" in doc.lower()


def test_default_config_comments_every_field_and_validates():
    path = os.path.join(ROOT, "qlora_jax", "train", "defaults.py")
    lines = open(path).read().splitlines()
    fields = [i for i, ln in enumerate(lines) if re.match(r"    c\.\w+\.\w+ = ", ln)]
    config = default_config()
    assert len(fields) == len(_leaves(config)) > 50
    for i in fields:
        above = lines[i - 1].strip()
        assert above.startswith("#"), f"defaults.py:{i + 1} has no comment above it"
    config.model.path = "/some/model"
    config.data.path = "/some/data.jsonl"
    validate(config)
    assert "debug_nan_at_step" not in config.train  # test hooks are not config fields


def _leaves(config, prefix=""):
    out = []
    for k in config.keys():
        v = config[k]
        out += _leaves(v, f"{prefix}{k}.") if hasattr(v, "keys") else [f"{prefix}{k}"]
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_overrides_the_defaults_under_comments_and_validates(name):
    """Each experiment starts from default_config() (directly or through another experiment),
    sets fields under a comment, and adds no field but the optional ones."""
    text = open(os.path.join(ROOT, "experiments", f"{name}.py")).read()
    assert "default_config()" in text or "load_experiment(" in text
    assert "c = ml_collections.ConfigDict()" not in text
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        if re.match(r"\s+c\.\w+\.\w+ = ", ln):
            j = i - 1
            while re.match(r"\s+c\.\w+\.\w+ = ", lines[j]):
                j -= 1
            assert lines[j].strip().startswith(("#", "with c.unlocked", "if ")), \
                f"{name}.py:{i + 1}: a block of settings needs a comment above it"
    config = load(name).get_config()
    if not config.model.path and "random" not in config.model:
        config.model.path = "/some/model"
    if not config.data.path:
        config.data.path = "/some/data.jsonl"
    validate(config)
    extra = set(_leaves(config)) - set(_leaves(default_config()))
    assert all(k.startswith("model.random.") for k in extra), extra


def test_unknown_field_fails_validation_and_the_defaults_are_locked():
    config = default_config()
    with pytest.raises(AttributeError, match="stpes"):
        config.train.stpes = 3
    config.model.path, config.data.path = "/m", "/d.jsonl"
    with config.unlocked():
        config.train.debug_nan_at_step = 5
    with pytest.raises(ConfigError, match="train.debug_nan_at_step is unknown"):
        validate(config)


def test_choices_are_the_code_constants():
    from qlora_jax import data, quant
    from qlora_jax.lora.config import INITS
    from qlora_jax.models.common import DTYPES, REMAT_MODES
    from qlora_jax.quant.qtensor import ALLOWED_NESTED_BLOCK_SIZES
    from qlora_jax.train import metrics, remat, state, task

    assert CHOICES["model.remat"] is remat.CHOICES and remat.CHOICES[:-1] == REMAT_MODES
    assert set(remat.SPEED_ORDER) == set(REMAT_MODES)
    assert CHOICES["data.overlong"] is data.OVERLONG
    assert CHOICES["model.dtype"] == tuple(DTYPES) and CHOICES["model.impl"] is quant.IMPLS
    assert CHOICES["quant.qtype"] is quant.QTYPES
    assert CHOICES["quant.block_size"] is quant.ALLOWED_BLOCK_SIZES
    assert CHOICES["quant.nested_block_size"] is ALLOWED_NESTED_BLOCK_SIZES
    assert CHOICES["lora.init"] is INITS and CHOICES["lora.dtype"] is state.ADAPTER_DTYPES
    assert CHOICES["data.format"] == ("auto",) + data.FORMATS
    assert CHOICES["optim.name"] is optim.OPTIMIZERS
    assert CHOICES["optim.schedule"] is optim.SCHEDULES
    assert CHOICES["model.task"] is task.TASKS
    assert CHOICES["train.progress"] is metrics.PROGRESS_MODES


def test_load_experiment_from_any_directory(tmp_path, monkeypatch):
    """Relative paths are taken from the current directory (as the launcher's --config), then
    from the checkout; an absolute path and an explicit repo_root work anywhere."""
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "mine.py").write_text(
        "from qlora_jax.train.defaults import default_config\n"
        "def get_config(arg='3'):\n"
        "    c = default_config()\n"
        "    c.train.steps = int(arg)\n"
        "    return c\n")
    monkeypatch.chdir(tmp_path)
    assert load_experiment("experiments/mine.py").train.steps == 3
    assert load_experiment("experiments/mine.py:7").train.steps == 7
    assert load_experiment("experiments/smoke.py").train.steps == 40  # from the checkout
    monkeypatch.chdir(ROOT)
    assert load_experiment(str(tmp_path / "experiments" / "mine.py:5")).train.steps == 5
    assert load_experiment("experiments/mine.py", repo_root=str(tmp_path)).train.steps == 3
    with pytest.raises(FileNotFoundError, match="no_such.py"):
        load_experiment("experiments/no_such.py")


def test_only_the_library_is_installed():
    """experiments/ and benchmarks/ are run from the repository root, not installed as
    top-level packages into site-packages."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["qlora_jax*"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama checkpoint over the smoke tokenizer, and prompt/response records."""
    d = tmp_path_factory.mktemp("tiny_llama")
    hf = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = qj.models.build_model(hf, dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(run_seed())
    params = jax.jit(model.init)(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                                 *model.dummy_inputs())["params"]
    qj.save_pretrained(model, params, str(d / "model"), dtype=jnp.float32)
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), d / "model" / f)
    words = ["alpha", "beta", "gamma", "delta", "sum", "list", "file", "path", "queue"]
    with open(d / "records.jsonl", "w") as f:
        for _ in range(24):
            w = rng.choice(words, 5)
            f.write(json.dumps({"prompt": "Reverse: " + " ".join(w) + "\n",
                                "response": " ".join(w[::-1])}) + "\n")
    return d


def recipe_config(tiny_llama):
    config = load("llama_qlora").get_config()
    config.model.path = str(tiny_llama / "model")
    config.data.path = str(tiny_llama / "records.jsonl")
    config.train.steps = 3
    config.train.batch_size = 4
    config.train.grad_accum = 2
    config.train.seq_len = 96
    config.train.loss_chunk = 32
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.eval_every = 0
    config.train.progress = "lines"
    config.quant.block_size = 32
    return config


@pytest.mark.slow  # a whole (short) run
def test_llama_qlora_recipe_runs_on_a_tiny_checkpoint(tiny_llama, tmp_path):
    config = recipe_config(tiny_llama)
    summary = loop.run(config, str(tmp_path), stream=io.StringIO())
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert 4.0 < summary["bits_per_4bit_param"] < 4.3  # NF4 + double quant (block 32)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    adapter = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 16
    tm = adapter["target_modules"]
    names = {tm} if isinstance(tm, str) else {t.split(".")[-1] for t in tm}
    assert names == {"all-linear"} or names >= {"q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"}, tm


@pytest.mark.slow  # r=64 model, loss and gradients compiled twice
def test_chunked_loss_is_selected_by_config_and_equals_full_loss(tiny_llama):
    config = recipe_config(tiny_llama)
    config.model.dtype = "float32"
    config.lora.init = "random"
    # The long-row options reach the model from the config (and run packed, with gradients).
    config.model.remat = "full_offload"
    config.model.mlp_chunk = 40
    model, params = build.load_model(config)
    task = build.make_task(config, model)
    assert task.loss_chunk == 32 and model.remat == "full_offload" and model.mlp_chunk == 40
    data = build.load_data(config)
    from qlora_jax import data as qdata

    batch = next(qdata.TrainLoader(data.train, 4, 0))
    assert task.packed   # the recipe packs rows: both losses see the segments
    full = Task(model, "causal_lm", 0, right_padded=True, packed=True)
    sums = lambda t, p: jax.jit(lambda p: t.sums(p, batch))(p)  # noqa: E731
    trainable, frozen = lp.partition(params)
    got = sums(task, params)
    want = sums(full, params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5)
    grad = lambda t: jax.jit(jax.grad(  # noqa: E731
        lambda tr: t.sums(lp.combine(tr, frozen), batch)[0]))(trainable)
    for a, b in zip(jax.tree.leaves(grad(full)), jax.tree.leaves(grad(task))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    config.optim.offload_state = True
    tx, _ = build.make_optimizer(config)
    from qlora_jax.train.state import create_state

    state = create_state(params, tx, 0, None, True)
    assert optim.memory_kinds(state.opt_state) == {"pinned_host"}


@pytest.mark.slow  # a whole (short) run on the real MiniLM
def test_quickstart_plumbing_on_real_minilm(tmp_path):
    """Two steps of the quickstart (the README's main job): 4-bit MiniLM, adapters, head."""
    config = load("quickstart").get_config()
    config.train.steps = 2
    config.train.batch_size = 4
    config.train.seq_len = 32
    config.train.eval_every = 2
    config.train.eval_batches = 1
    config.train.eval_batch_size = 8
    config.train.checkpoint_every = 0
    config.train.progress = "lines"
    summary = loop.run(config, str(tmp_path), stream=io.StringIO())
    assert summary["eval_before"]["eval_count"] == 8 and "eval_after" in summary
    evals = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert [r["step"] for r in evals] == [0, 2] and all("eval_accuracy" in r for r in evals)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2] and all("loss" in r for r in records)
    assert abs(summary["bits_per_4bit_param"] - 4.127) < 0.01
    # Adapters r=16 on the 36 encoder linear layers + the 8-way head (weight and bias) + pooler.
    assert summary["trainable_params"] > 8 * 384
    adapter = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert adapter["r"] == 16 and "classifier" in adapter["modules_to_save"]
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("classifier" in k for k in tensors)
    assert any("attention.self.query.lora_A" in k for k in tensors)
