"""LoraConfig: which linear layers get adapters, with what rank and scaling (PEFT semantics)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

from qlora_jax import module_names

INITS = ("default", "gaussian", "random", "pissa", "pissa_niter_K", "olora", "loftq")
DATA_AWARE = ("pissa", "olora", "loftq")


def data_aware(init: str) -> bool:
    """Whether ``init`` is computed from the base weight (PiSSA, OLoRA, LoftQ)."""
    return init in DATA_AWARE or re.fullmatch(r"pissa_niter_\d+", init) is not None


def valid_init(init: str) -> bool:
    return init in INITS[:3] or data_aware(init)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapter of one linear module: rank, alpha, scaling, dropout and init."""

    r: int
    alpha: float
    scaling: float
    dropout: float
    init: str
    use_dora: bool = False


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings with the semantics of ``peft.LoraConfig``.

    Attributes:
      r: adapter rank R.
      alpha: ``lora_alpha``; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)``
        with ``use_rslora``).
      dropout: dropout on the adapter's input during training.
      target_modules: a list of names matched against module names by suffix
        (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``), a string
        matched as a full regex against the whole module name, ``"all-linear"``
        for every linear layer except the output head, or None for the model
        family's default (PEFT's defaults: q and v projections).
      init: ``"default"`` (A Kaiming-uniform with a=sqrt(5), i.e.
        U(-1/sqrt(in), 1/sqrt(in)), B zero), ``"gaussian"`` (A ~ N(0, std 1/r), B
        zero), ``"random"`` (both random, a non-identity start for tests;
        PEFT's ``init_lora_weights=False``); data-aware, from the base weight
        (``qj.lora.init``): ``"pissa"`` (top-R singular vectors, full SVD),
        ``"pissa_niter_K"`` (randomized SVD, K subspace iterations), ``"olora"``
        (QR), ``"loftq"`` (alternating 4-bit quantization and low-rank fit; for
        quantized bases). PiSSA/OLoRA change the base weight to ``W - s B A``.
        PEFT's True/False are accepted.
      use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
      use_dora: DoRA (weight-decomposed LoRA, as PEFT): a trained magnitude per output
        feature (``lora_magnitude``) times the row-normalised ``W + s B A``.
      rank_pattern / alpha_pattern: ``{pattern: value}`` overriding r / alpha for
        modules whose name matches ``(.*\\.)?pattern$``.
      modules_to_save: module names (suffix match) trained in full, e.g. a
        classification head.
      loftq_iter: alternating rounds of ``init="loftq"`` (PEFT's ``loftq_iter``).
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: Optional[Union[str, Sequence[str]]] = None
    init: Union[str, bool] = "default"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Sequence[str] = ()
    loftq_iter: int = 1

    def __post_init__(self):
        init = self.init
        if init is True:
            init = "default"
        elif init is False:
            init = "random"
        if not isinstance(init, str) or not valid_init(init):
            raise ValueError(f"LoraConfig.init={self.init!r} is not supported; use one of "
                             f"{INITS} (K an integer)")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"LoraConfig.loftq_iter must be an integer >= 1, got "
                             f"{self.loftq_iter!r}")
        object.__setattr__(self, "init", init)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern),
                              ("alpha_pattern", self.alpha_pattern)):
            for key, value in dict(pattern).items():
                if name == "rank_pattern" and (not isinstance(value, int) or value <= 0):
                    raise ValueError(f"rank_pattern[{key!r}] must be a positive int, got {value!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            object.__setattr__(self, "target_modules", tuple(tm))
        object.__setattr__(self, "rank_pattern", _FrozenDict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", _FrozenDict(self.alpha_pattern))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))

    # -- matching -----------------------------------------------------------------------------
    def matches(self, module_name: str, *, is_head: bool = False,
                default_targets: Sequence[str] = ("q_proj", "v_proj")) -> bool:
        """Whether a linear module (dotted Hugging Face name) gets an adapter."""
        tm = self.target_modules
        if tm is None:
            tm = tuple(default_targets)
        if isinstance(tm, str):
            if tm == "all-linear":
                return not is_head
            return module_names.matches_regex(module_name, tm)
        return module_names.matches_any(module_name, tm)

    def target_matches_anything(self, target: str, names: Sequence[str]) -> bool:
        return any(module_names.matches(n, target) for n in names)

    def saves(self, module_name: str) -> bool:
        """Whether ``module_name`` is trained in full (``modules_to_save``)."""
        return module_names.matches_any(module_name, self.modules_to_save)

    def spec(self, module_name: str) -> LoraSpec:
        """The adapter settings for a targeted module (patterns applied)."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.alpha)
        scaling = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return LoraSpec(r=int(r), alpha=float(alpha), scaling=float(scaling),
                        dropout=float(self.dropout), init=self.init,
                        use_dora=bool(self.use_dora))

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


def _pattern_value(pattern: Mapping[str, Any], module_name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if module_names.matches_pattern(module_name, key):
            return value
    return default


class _FrozenDict(dict):
    """A hashable dict for the frozen config's pattern fields."""

    def __hash__(self):  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __setitem__(self, key, value):
        raise TypeError("LoraConfig patterns are read-only")
