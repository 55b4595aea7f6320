"""LoraPlan: a LoraConfig resolved against one model's modules.

A model lists its modules as ``ModuleSite``s: the Flax scope path of the
module, the Hugging Face names it stands for (one a layer when layers are
stacked with ``nn.scan``) and its kind. Resolving a config checks every
target and ``modules_to_save`` entry against those names, once, before any
parameter exists, and gives each Flax path its ``LoraSpec``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from qlora_jax import module_names
from qlora_jax.lora.config import LoraConfig, LoraSpec

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ModuleSite:
    """One module of a model.

    Attributes:
      path: Flax scope path, e.g. ``("model", "layers", "self_attn", "q_proj")``.
      hf_names: the Hugging Face module names this path stands for, e.g.
        ``("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")``.
      kind: ``"linear"``, ``"head"`` (the output projection; skipped by
        ``"all-linear"``) or ``"other"`` (norms, embeddings: only for modules_to_save).
    """

    path: Path
    hf_names: tuple[str, ...]
    kind: str = "linear"


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """Which Flax paths carry adapters (with their specs) and which are trained in full."""

    config: LoraConfig
    specs: tuple[tuple[Path, LoraSpec], ...]
    saved: tuple[Path, ...]

    def spec_at(self, path: Sequence[str]) -> Optional[LoraSpec]:
        path = tuple(path)
        for p, spec in self.specs:
            if p == path:
                return spec
        return None

    def saves(self, path: Sequence[str]) -> bool:
        path = tuple(path)
        return any(path[: len(p)] == p for p in self.saved)

    @property
    def adapted_paths(self) -> tuple[Path, ...]:
        return tuple(p for p, _ in self.specs)


def resolve(config: LoraConfig, sites: Sequence[ModuleSite],
            default_targets: Sequence[str] = ("q_proj", "v_proj")) -> LoraPlan:
    """Resolves ``config`` against a model's modules.

    Raises:
      ValueError: a target or modules_to_save entry matches no module (named,
        with the model's module names), a target selects a module that is not
        linear, or a pattern gives stacked layers different ranks (layers stacked
        with ``nn.scan`` share one adapter shape).
    """
    linear = [s for s in sites if s.kind in ("linear", "head")]
    all_linear_names = [n for s in linear for n in s.hf_names]
    all_names = [n for s in sites for n in s.hf_names]
    tm = config.target_modules if config.target_modules is not None else tuple(default_targets)
    if isinstance(tm, str):
        if tm != "all-linear" and not any(config.matches(n) for n in all_linear_names):
            raise ValueError(f"target_modules regex {tm!r} matches no linear module of this model; "
                             f"its linear modules look like: {_examples(all_linear_names)}")
    else:
        missing = [t for t in tm if not config.target_matches_anything(t, all_linear_names)]
        if missing:
            raise ValueError(f"target_modules {missing} match no linear module of this model; "
                             f"its linear module names end in: {_suffixes(all_linear_names)}")
    for m in config.modules_to_save:
        if not any(module_names.matches(n, m) for n in all_names):
            raise ValueError(f"modules_to_save entry {m!r} matches no module of this model; "
                             f"modules: {_suffixes(all_names)}")
    specs: list[tuple[Path, LoraSpec]] = []
    saved: list[Path] = []
    for site in sites:
        if any(config.saves(n) for n in site.hf_names):
            if not all(config.saves(n) for n in site.hf_names):
                raise ValueError(_per_layer_message("modules_to_save", site))
            saved.append(site.path)
            continue
        if site.kind not in ("linear", "head"):
            continue
        hits = [config.matches(n, is_head=site.kind == "head", default_targets=default_targets)
                for n in site.hf_names]
        if not any(hits):
            continue
        if not all(hits):
            raise ValueError(_per_layer_message("target_modules", site))
        layer_specs = {config.spec(n) for n in site.hf_names}
        if len(layer_specs) != 1:
            raise ValueError(_per_layer_message("rank_pattern/alpha_pattern", site))
        specs.append((site.path, layer_specs.pop()))
    if not specs and not saved:
        raise ValueError("this LoraConfig adapts no module and saves none")
    return LoraPlan(config=config, specs=tuple(specs), saved=tuple(saved))


def _per_layer_message(field: str, site: ModuleSite) -> str:
    return (f"{field} treats the stacked layers of {'.'.join(site.path)} differently "
            f"(e.g. {site.hf_names[0]} vs {site.hf_names[-1]}); qlora_jax stacks layers with "
            "nn.scan, so every layer must get the same adapter: select modules by name, not by "
            "layer index")


def _suffixes(names: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n.split(".")[-1], None)
    return list(seen)


def _examples(names: Sequence[str], k: int = 4) -> list[str]:
    return list(dict.fromkeys(names))[:k]
