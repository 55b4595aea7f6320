"""Matching Hugging Face module names (``model.layers.0.self_attn.q_proj``) as PEFT does.

The one place that decides whether a name is selected by an entry of ``target_modules``,
``modules_to_save``, ``rank_pattern`` / ``alpha_pattern`` or ``QuantConfig.skip``. It imports
nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import re
from typing import Iterable


def matches(name: str, key: str) -> bool:
    """A list entry (``target_modules``, ``modules_to_save``, ``skip``): ``key`` is the name
    itself or its last dotted components (``"q_proj"``, ``"self_attn.q_proj"``)."""
    return name == key or name.endswith("." + key)


def matches_any(name: str, keys: Iterable[str]) -> bool:
    """``matches(name, key)`` for some ``key`` of ``keys``."""
    return any(matches(name, k) for k in keys)


def matches_regex(name: str, regex: str) -> bool:
    """A ``target_modules`` string: a regular expression the whole name must match."""
    return re.fullmatch(regex, name) is not None


def matches_pattern(name: str, key: str) -> bool:
    """A ``rank_pattern`` / ``alpha_pattern`` key: a regular expression for the name's last
    dotted components (a plain key behaves like ``matches``)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None
