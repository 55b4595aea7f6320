"""What every qlora_jax model provides to the LoRA machinery and to sharding.

A model is a Flax linen module with the attributes ``lora`` (a LoraConfig or
None) and ``quant`` (a QuantConfig or None), and a ``module_sites()`` method
listing its modules with their Hugging Face names. ``lora_plan()`` resolves
the config against them once (cached), and every ``LoraDense`` of the model
receives its adapter's spec.

Its modules declare the logical axes of the parameters they create (``models.axes``);
``init`` returns plain arrays and ``param_axes()`` the declared names (from ``init`` on
``dummy_inputs()``), so sharding needs no knowledge of any model family. ``hf_architecture()``
names the transformers class a saved checkpoint declares.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax

from qlora_jax.lora.config import LoraConfig
from qlora_jax.lora.plan import LoraPlan, ModuleSite, resolve
from qlora_jax.models import axes as model_axes


@functools.lru_cache(maxsize=64)
def _resolve_cached(config: LoraConfig, sites: tuple[ModuleSite, ...],
                    default_targets: tuple[str, ...]) -> LoraPlan:
    return resolve(config, sites, default_targets)


class LoraModelMixin:
    """Mixin for models: ``lora_plan()`` from ``self.lora`` and ``self.module_sites()``."""

    #: PEFT's default target modules for the family (used when target_modules is None).
    default_lora_targets: Sequence[str] = ("q_proj", "v_proj")

    def module_sites(self) -> list[ModuleSite]:  # pragma: no cover - each model implements it
        raise NotImplementedError

    def lora_plan(self) -> Optional[LoraPlan]:
        lora = getattr(self, "lora", None)
        if lora is None:
            return None
        return _resolve_cached(lora, tuple(self.module_sites()), tuple(self.default_lora_targets))

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.init`` returning plain arrays (the axes boxes taken off: ``param_axes``)."""
        return model_axes.unbox(super().init(rngs, *args, **kwargs))

    def param_axes(self) -> dict[str, Any]:
        """The logical axes of every parameter, as a nested dict like the params tree.

        Each leaf is a tuple of names (float kernels ``[in, out]``, stacked ones ``["layers",
        in, out]``; a QTensor kernel gets the names of the float kernel it stands for), or None
        where the model declares none. Read from the boxed tree of Flax's own ``init`` on
        shapes only (nothing is computed).
        """
        boxed = jax.eval_shape(lambda: nn.Module.init(self, jax.random.key(0),
                                                      *self.dummy_inputs()))
        return model_axes.declared_axes(boxed["params"])
