"""Experiment configs: validation before any work, and the resolved JSON form kept in the workdir.

An experiment config (``experiments/NAME.py``, ``get_config()``) is an ``ml_collections.ConfigDict``
with the sections ``model``, ``quant``, ``lora``, ``data``, ``optim``, ``train`` and ``mesh``.
``validate`` checks every field's type and range and the relations between fields, and raises a
`ConfigError` naming the field, the value and what is allowed. Given the run's device and process
counts it also checks the mesh: data x fsdp x tensor must be the number of devices (the trivial
mesh (1, 1, 1) in one process runs on the first device of any machine), and the batch sizes must
split over the batch mesh axes (times the micro-batches) and over the processes. ``resolve``
gives the plain JSON dict written to ``config.json``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

SECTIONS = ("model", "quant", "lora", "data", "optim", "train", "mesh")

CHOICES: dict[str, tuple[Any, ...]] = {
    "model.task": ("causal_lm", "classification"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots_saveable", "offload", "qkv", "attention"),
    "model.impl": ("auto", "xla", "pallas"),
    "quant.qtype": ("nf4", "fp4", "int4"),
    "quant.block_size": (32, 64, 128, 256, 512, 1024, 2048, 4096),
    "quant.nested_block_size": (256,),
    "lora.init": ("default", "gaussian", "random"),
    "lora.dtype": ("float32", "bfloat16"),
    "data.format": ("auto", "alpaca", "prompt_response", "chat", "classification"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "train.progress": ("auto", "bar", "lines"),
}
POSITIVE_INTS = ("lora.r", "train.steps", "train.batch_size", "train.grad_accum", "train.seq_len",
                 "train.log_every", "train.keep_checkpoints", "train.eval_batch_size",
                 "mesh.data", "mesh.fsdp", "mesh.tensor")
NONNEGATIVE_INTS = ("model.num_labels", "train.checkpoint_every", "train.eval_every",
                    "train.eval_batches", "train.loss_chunk")
NONNEGATIVE_FLOATS = ("lora.alpha", "optim.warmup_ratio", "optim.end_lr_ratio",
                      "optim.weight_decay", "optim.max_grad_norm", "optim.b1", "optim.b2",
                      "optim.eps")


class ConfigError(ValueError):
    """A config field has a bad value (raised before any work)."""


def get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config: Any, device_count: Optional[int] = None, process_count: int = 1) -> None:
    """Checks an experiment config.

    Args:
      config: the experiment config.
      device_count: devices of the run (``jax.device_count()``, all processes); None skips the
        check that the mesh covers them.
      process_count: processes of the run (``jax.process_count()``); batches split over them.

    Raises:
      ConfigError: a missing section or field, a value of the wrong type or out of range, or
        fields that disagree (e.g. a batch size that does not split into micro-batches).
    """
    for section in SECTIONS:
        if section not in config:
            raise ConfigError(f"config has no section {section!r}; an experiment config needs "
                              f"{', '.join(SECTIONS)}")

    def field(dotted: str) -> Any:
        try:
            return get(config, dotted)
        except (KeyError, AttributeError):
            raise ConfigError(f"config field {dotted} is missing") from None

    for dotted, allowed in CHOICES.items():
        value = field(dotted)
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(f"config.{dotted}={value!r} is not allowed; use one of "
                              f"{', '.join(map(repr, allowed))}")
    for dotted in POSITIVE_INTS + NONNEGATIVE_INTS:
        value = field(dotted)
        low = 1 if dotted in POSITIVE_INTS else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"config.{dotted}={value!r} must be an integer >= {low}")
    for dotted in NONNEGATIVE_FLOATS + ("optim.learning_rate", "lora.dropout"):
        value = field(dotted)
        if not _number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"config.{dotted}={value!r} must be a finite number >= 0")
    if not field("optim.learning_rate") > 0:
        raise ConfigError("config.optim.learning_rate must be > 0")
    if not field("lora.dropout") < 1:
        raise ConfigError(f"config.lora.dropout={field('lora.dropout')!r} must be in [0, 1)")
    if not field("optim.warmup_ratio") < 1:
        raise ConfigError("config.optim.warmup_ratio must be in [0, 1)")
    for dotted in ("optim.warmup_steps", "train.debug_nan_at_step", "train.seed"):
        value = field(dotted)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config.{dotted}={value!r} must be an integer")
    for dotted in ("quant.enabled", "quant.double_quant", "lora.use_rslora", "data.packing",
                   "optim.offload_state"):
        if not isinstance(field(dotted), bool):
            raise ConfigError(f"config.{dotted}={field(dotted)!r} must be True or False")
    for dotted in ("model.path", "model.tokenizer", "data.path", "data.eval_path"):
        if not isinstance(field(dotted), str):
            raise ConfigError(f"config.{dotted}={field(dotted)!r} must be a string")
    tm = field("lora.target_modules")
    if not (isinstance(tm, str) or (isinstance(tm, (tuple, list))
                                    and all(isinstance(t, str) for t in tm))):
        raise ConfigError(f"config.lora.target_modules={tm!r} must be a regex string, "
                          "'all-linear' or a tuple of module names")
    b, a = field("train.batch_size"), field("train.grad_accum")
    if b % a:
        raise ConfigError(f"config.train.batch_size={b} does not split into "
                          f"train.grad_accum={a} micro-batches; use a divisor of the batch size")
    for dotted, low in (("train.samples", 0), ("train.sample_tokens", 1)):  # optional fields
        if dotted.split(".")[1] in config.train:
            value = field(dotted)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"config.{dotted}={value!r} must be an integer >= {low}")
    _validate_mesh(config, device_count, process_count)
    if not field("model.path") and "random" not in config.model:
        raise ConfigError("config.model.path is empty and there is no config.model.random "
                          "section: give a checkpoint directory with --config.model.path=DIR")
    if not field("data.path"):
        raise ConfigError("config.data.path is empty: give a JSONL file or a builtin dataset name "
                          "with --config.data.path=...")
    if field("train.loss_chunk") and field("model.task") != "causal_lm":
        raise ConfigError("config.train.loss_chunk applies to causal_lm models only; set it to 0")
    if field("data.packing") and field("model.task") == "causal_lm":
        raise ConfigError("config.data.packing=True needs a model that masks attention by "
                          "segment_ids; the Llama models do not yet: set data.packing=False")


def batch_axes(config: Any) -> tuple[tuple[str, int], ...]:
    """(mesh axis, size) of the mesh axes that split a batch's rows, by ``config.mesh.rules``."""
    from qlora_jax import sharding

    try:
        rules = sharding.rules_from_config(config.mesh)
    except ValueError as e:
        raise ConfigError(f"config.mesh.rules: {e}") from None
    sizes = {k: config.mesh[k] for k in sharding.MESH_AXES}
    return tuple((a, sizes[a]) for a in sharding._mesh_axes_for("batch", rules))  # noqa: SLF001


def _validate_mesh(config: Any, device_count: Optional[int], process_count: int) -> None:
    """The mesh covers the devices; batches split over the batch mesh axes and the processes."""
    sizes = tuple(config.mesh[k] for k in ("data", "fsdp", "tensor"))
    shown = " x ".join(map(str, sizes))
    n = math.prod(sizes)
    if device_count is not None and n != device_count and not (n == 1 and process_count == 1):
        raise ConfigError(f"config.mesh data x fsdp x tensor = {shown} = {n} devices, but this "
                          f"run has {device_count} devices (jax.device_count(), "
                          f"{process_count} process(es)); make the product {device_count}")
    axes = [(a, s) for a, s in batch_axes(config) if s > 1]
    split = math.prod(s for _, s in axes)
    over = (" x ".join(a for a, _ in axes) + " = " + " x ".join(str(s) for _, s in axes)
            if axes else "none")
    b, accum = config.train.batch_size, config.train.grad_accum
    if b % (split * accum):
        raise ConfigError(f"config.train.batch_size={b} does not split over the batch mesh axes "
                          f"({over}) in each of train.grad_accum={accum} micro-batches; use a "
                          f"multiple of {split * accum}")
    eb = config.train.eval_batch_size
    if eb % split:
        raise ConfigError(f"config.train.eval_batch_size={eb} does not split over the batch mesh "
                          f"axes ({over}); use a multiple of {split}")
    for name, value in (("batch_size", b), ("eval_batch_size", eb)):
        if value % process_count:
            raise ConfigError(f"config.train.{name}={value} does not split over the "
                              f"{process_count} processes; use a multiple of {process_count}")


def resolve(config: Any) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists), as written to config.json."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(raw, sort_keys=True, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"config value {x!r} of type {type(x).__name__} is not JSON-serialisable")


def differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


def load_experiment(spec: str, repo_root: Optional[str] = None) -> Any:
    """An experiment config from ``"experiments/NAME.py"`` or ``"experiments/NAME.py:ARG"``.

    ``ARG`` is passed to ``get_config`` as the launcher does; a relative path is taken from
    ``repo_root`` (default: the checkout holding this package). Experiments derived from another
    one load it with this too.
    """
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    root = repo_root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full = path if os.path.isabs(path) else os.path.join(root, path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"experiment config {full} does not exist")
    name = "_qj_experiment_" + os.path.splitext(os.path.basename(full))[0]
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()

