"""Trainable: a box that marks a ``modules_to_save`` parameter as trained in full.

Flax reads boxed parameters unboxed (``flax.core.meta.AxisMetadata``), so the
model code is the same with or without the mark; only the params tree records
that this leaf is trainable.
"""

from __future__ import annotations

from typing import Any

from flax import struct
from flax.core import meta


class Trainable(struct.PyTreeNode, meta.AxisMetadata):
    """Marks a non-adapter parameter as trainable (``LoraConfig.modules_to_save``)."""

    value: Any

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val: Any) -> "Trainable":
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> "Trainable":
        return self

    def remove_axis(self, index: int, params: dict[Any, Any]) -> "Trainable":
        return self
