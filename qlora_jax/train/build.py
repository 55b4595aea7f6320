"""Everything a run needs, built from an experiment config: tokenizer, data, model, optimizer.

The order matters for bad input: cheap checks first (paths, tokenizer, data files), the model
(the expensive part) last, so a typo fails in a second and leaves no files behind.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import optax

from qlora_jax import data as qdata
from qlora_jax.lora import init as lora_init
from qlora_jax.lora import tree as lora_tree
from qlora_jax.lora.config import LoraConfig, data_aware
from qlora_jax.models.common import DTYPES
from qlora_jax.quant.config import QuantConfig
from qlora_jax.train import optim as train_optim
from qlora_jax.train.config import ConfigError
from qlora_jax.train.task import Task


@dataclasses.dataclass
class Data:
    """Tokenizer and datasets of a run."""

    tokenizer: Any
    train: Any
    eval: Optional[Any]


def check_paths(config: Any) -> None:
    """Raises ConfigError (one short line) for a model/tokenizer path that does not exist."""
    from qlora_jax.formats.gguf import is_gguf

    path = config.model.path
    if path and is_gguf(path):  # a llama.cpp file (or a directory holding one)
        pass
    elif path and not os.path.isdir(path):
        raise ConfigError(f"model path {path} does not exist (config.model.path)")
    elif path and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model path {path} holds no config.json and no .gguf file "
                          "(config.model.path)")
    tok = config.model.tokenizer or path
    if not tok:
        raise ConfigError("config.model.tokenizer is empty and there is no model.path to take "
                          "the tokenizer from")
    if not os.path.exists(tok):
        raise ConfigError(f"tokenizer path {tok} does not exist (config.model.tokenizer)")


def check_positions(config: Any) -> None:
    """Raises ConfigError when ``train.seq_len`` exceeds a model's learned position embeddings.

    BERT-family encoders (BERT, RoBERTa, MiniLM) look positions up in a table of
    ``max_position_embeddings`` rows (RoBERTa's start after its padding id), so longer rows are
    refused here, before any work, as transformers refuses them. RoPE models (Llama, Mistral,
    Qwen2) compute rotations for any position, as transformers does, and take any seq_len.
    """
    path = config.model.path
    cfg_path = os.path.join(path, "config.json") if path else ""
    if path and not os.path.isfile(cfg_path):
        return
    if path:
        import json

        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    else:
        hf = dict(config.model.random)
    if hf.get("model_type") not in ("bert", "roberta"):
        return
    limit = int(hf.get("max_position_embeddings", 512))
    if hf.get("model_type") == "roberta":
        limit -= int(hf.get("pad_token_id") or 0) + 1
    if config.train.seq_len > limit:
        raise ConfigError(f"config.train.seq_len={config.train.seq_len} exceeds the {limit} "
                          f"positions of this {hf['model_type']} model (learned position "
                          f"embeddings, max_position_embeddings="
                          f"{hf.get('max_position_embeddings', 512)}); use seq_len <= {limit}")


def load_data(config: Any) -> Data:
    """Tokenizer, training set and evaluation set (DataError on bad files or records)."""
    tokenizer = qdata.load_tokenizer(config.model.tokenizer or config.model.path)
    section = {k: config.data[k] for k in qdata.default_config().keys() if k in config.data}
    train, evaluation = qdata.datasets_from_config(section, tokenizer, config.train.seq_len)
    if train.kind != config.model.task:
        raise ConfigError(f"config.data.path={config.data.path} holds {train.kind} data but "
                          f"config.model.task={config.model.task!r}")
    return Data(tokenizer, train, evaluation)


def quant_config(config: Any) -> Optional[QuantConfig]:
    q = config.quant
    if not q.enabled:
        return None
    return QuantConfig(qtype=q.qtype, block_size=q.block_size, double_quant=q.double_quant,
                       nested_block_size=q.nested_block_size, skip=tuple(q.skip))


def lora_config(config: Any) -> LoraConfig:
    c = config.lora
    tm = c.target_modules if isinstance(c.target_modules, str) else tuple(c.target_modules)
    return LoraConfig(r=c.r, alpha=c.alpha, dropout=c.dropout, target_modules=tm, init=c.init,
                      use_rslora=c.use_rslora, modules_to_save=tuple(c.modules_to_save),
                      use_dora=c.use_dora, loftq_iter=c.loftq_iter)


def load_model(config: Any, num_labels: int = 0) -> tuple[Any, Any]:
    """(model, params): a checkpoint read with quantize-on-load, or a random model.

    A random model (``model.path == ""``) is built from the Hugging Face config fields in
    ``model.random`` and initialised from ``train.seed``; its weights (and their 4-bit codes) are
    the same in every run of the config, so such runs resume exactly too.
    """
    from qlora_jax.checkpoints import hf_load
    from qlora_jax.models import build_model

    dtype = DTYPES[config.model.dtype]
    quant, lora = quant_config(config), lora_config(config)
    # remat="auto" is resolved on the built step (qlora_jax.train.remat); the model starts at none.
    remat = "none" if config.model.remat == "auto" else config.model.remat
    kw = dict(impl=config.model.impl, remat=remat, num_labels=num_labels,
              mlp_chunk=config.model.mlp_chunk)
    if config.model.path:
        return hf_load.from_pretrained(config.model.path, dtype=dtype, quant=quant, lora=lora,
                                       seed=config.train.seed, **kw)
    base = build_model(dict(config.model.random), dtype=dtype, param_dtype=dtype, **kw)
    model = base.clone(quant=quant, lora=lora)
    model.lora_plan()  # unmatched targets fail before any work
    init = jax.jit(base.clone(quant=quant).init)
    key = jax.random.PRNGKey(config.train.seed)
    params = init(key, *base.dummy_inputs())["params"]
    plan = model.lora_plan()
    aware = [p for p, s in (plan.specs if plan else ()) if data_aware(s.init)]
    if aware and quant is not None:
        # Data-aware inits decompose the float weights the 4-bit kernels were made from.
        floats = lora_tree.flatten(jax.jit(base.init)(key, *base.dummy_inputs())["params"])
        flat = lora_tree.flatten(params)
        for path in aware:
            flat[path + ("kernel",)] = floats[path + ("kernel",)]
        params = lora_tree.unflatten(flat)
    params = hf_load.add_adapters(model, params, config.train.seed)
    return model, lora_init.initialize(model, params, config.train.seed, quant)


def make_task(config: Any, model: Any) -> Task:
    """The run's Task: unpacked causal-LM rows are right-padded (the attention mask is redundant
    and the model may use mask-free fused attention); packed rows pass segment and position ids.

    Raises:
      ValueError: data.packing=True with a model that does not take segment_ids.
    """
    causal = config.model.task == "causal_lm"
    return Task(model, config.model.task, config.train.loss_chunk, right_padded=causal,
                packed=causal and bool(config.data.packing))


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = train_optim.make_schedule(config.optim, config.train.steps)
    return train_optim.make_optimizer(config.optim, schedule), schedule
