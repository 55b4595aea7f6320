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
import re
from typing import Any, Mapping, Optional

from qlora_jax.data import FORMATS as DATA_FORMATS
from qlora_jax.data import OVERLONG
from qlora_jax.lora.config import INITS
from qlora_jax.models.common import DTYPES as MODEL_DTYPES
from qlora_jax.quant import ALLOWED_BLOCK_SIZES, IMPLS, QTYPES
from qlora_jax.quant.qtensor import ALLOWED_NESTED_BLOCK_SIZES
from qlora_jax.train.defaults import OPTIONAL_FIELDS, default_config
from qlora_jax.train.metrics import PROGRESS_MODES
from qlora_jax.train.optim import OPTIMIZERS, SCHEDULES
from qlora_jax.train.remat import CHOICES as REMAT_CHOICES
from qlora_jax.train.state import ADAPTER_DTYPES
from qlora_jax.train.task import TASKS

SECTIONS = ("model", "quant", "lora", "data", "optim", "train", "mesh")

# The allowed values of the choice fields, from the code that implements them.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.task": TASKS,
    "model.dtype": tuple(MODEL_DTYPES),
    "model.remat": REMAT_CHOICES,
    "model.impl": IMPLS,
    "quant.qtype": QTYPES,
    "quant.block_size": ALLOWED_BLOCK_SIZES,
    "quant.nested_block_size": ALLOWED_NESTED_BLOCK_SIZES,
    "lora.init": INITS,
    "lora.dtype": ADAPTER_DTYPES,
    "data.format": ("auto",) + DATA_FORMATS,
    "data.overlong": OVERLONG,
    "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
    "train.progress": PROGRESS_MODES,
}
POSITIVE_INTS = ("lora.r", "lora.loftq_iter", "train.steps", "train.batch_size", "train.grad_accum", "train.seq_len",
                 "train.log_every", "train.keep_checkpoints", "train.eval_batch_size",
                 "train.sample_tokens", "mesh.data", "mesh.fsdp", "mesh.tensor")
NONNEGATIVE_INTS = ("model.num_labels", "model.mlp_chunk", "train.checkpoint_every", "train.eval_every",
                    "train.eval_batches", "train.loss_chunk", "train.samples")
NONNEGATIVE_FLOATS = ("lora.alpha", "optim.loraplus_lr_ratio", "optim.warmup_ratio", "optim.end_lr_ratio",
                      "optim.weight_decay", "optim.max_grad_norm", "optim.b1", "optim.b2",
                      "optim.eps", "train.checkpoint_every_minutes", "train.memory_budget_gib")


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

    unknown = sorted(set(_dotted_keys(config)) - set(_dotted_keys(default_config())))
    unknown = [k for k in unknown if not k.startswith(tuple(f + "." for f in OPTIONAL_FIELDS))
               and k not in OPTIONAL_FIELDS]
    if unknown:
        raise ConfigError(f"config field {unknown[0]} is unknown (every field is in "
                          "qlora_jax.train.defaults.default_config()); check its spelling")
    for dotted, allowed in CHOICES.items():
        value = field(dotted)
        if dotted == "lora.init" and isinstance(value, str) and re.fullmatch(
                r"pissa_niter_\d+", value):
            continue  # INITS names this one "pissa_niter_K"
        if dotted == "lora.init" and value == "pissa_niter_K":
            raise ConfigError("config.lora.init='pissa_niter_K': K is the number of subspace "
                              "iterations, an integer (e.g. 'pissa_niter_4')")
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
    for dotted in ("optim.warmup_steps", "train.seed"):
        value = field(dotted)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config.{dotted}={value!r} must be an integer")
    if not field("optim.loraplus_lr_ratio") > 0:
        raise ConfigError(f"config.optim.loraplus_lr_ratio={field('optim.loraplus_lr_ratio')!r} "
                          "must be > 0 (1 = plain LoRA)")
    for dotted in ("quant.enabled", "quant.double_quant", "lora.use_rslora", "lora.use_dora",
                   "data.packing",
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
    _validate_mesh(config, device_count, process_count)
    if not field("model.path") and "random" not in config.model:
        raise ConfigError("config.model.path is empty and there is no config.model.random "
                          "section: give a checkpoint directory with --config.model.path=DIR")
    if not field("data.path"):
        raise ConfigError("config.data.path is empty: give a JSONL file or a builtin dataset name "
                          "with --config.data.path=...")
    if field("train.loss_chunk") and field("model.task") != "causal_lm":
        raise ConfigError("config.train.loss_chunk applies to causal_lm models only; set it to 0")


def _dotted_keys(config: Any, prefix: str = "") -> list[str]:
    """The dotted names of a config's leaf fields (``model.path``, ...)."""
    out = []
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys"):
            out += _dotted_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def batch_axes(config: Any) -> tuple[tuple[str, int], ...]:
    """(mesh axis, size) of the mesh axes that split a batch's rows, by ``config.mesh.rules``."""
    from qlora_jax import sharding
    from qlora_jax.quant.partition import mesh_axes_for

    try:
        rules = sharding.rules_from_config(config.mesh)
    except ValueError as e:
        raise ConfigError(f"config.mesh.rules: {e}") from None
    sizes = {k: config.mesh[k] for k in sharding.MESH_AXES}
    return tuple((a, sizes[a]) for a in mesh_axes_for("batch", rules))


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

    ``ARG`` is passed to ``get_config`` as the launcher does. A relative path is taken from
    ``repo_root`` when given, else from the current directory (as the launcher's ``--config``
    is); when it is not there, from the source checkout holding this package, if there is one
    (so notebooks run from ``notebooks/`` find ``experiments/``). Experiments derived from
    another one load it with this too, by its absolute path.

    Raises:
      FileNotFoundError: no such experiment file.
    """
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    full = path
    if not os.path.isabs(path):
        checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        bases = [repo_root] if repo_root else [os.getcwd(), checkout]
        full = next((os.path.join(b, path) for b in bases if os.path.isfile(os.path.join(b, path))),
                    os.path.join(bases[0], path))
    if not os.path.isfile(full):
        raise FileNotFoundError(f"experiment config {full} does not exist")
    name = "_qj_experiment_" + os.path.splitext(os.path.basename(full))[0]
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
