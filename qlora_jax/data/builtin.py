"""Datasets shipped with the package (qlora_jax/data/assets/)."""

from __future__ import annotations

import json
import os

from qlora_jax.data.errors import DataError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUILTINS = ("stdlib_docstrings", "stdlib_chat")
#: Builtins whose records carry classification labels (labels.json).
CLASSIFICATION = ("stdlib_docstrings",)
SPLITS = ("train", "validation", "test")
_SPLITS = {"stdlib_docstrings": SPLITS, "stdlib_chat": ("train", "validation")}


def builtin_path(name: str, split: str) -> str:
    """Path of a split of a builtin dataset.

    Raises:
        DataError: unknown name or split, or the asset file is missing from the installation.
    """
    if name not in BUILTINS:
        raise DataError(f"unknown builtin dataset {name!r}; builtins: {list(BUILTINS)}")
    if split not in _SPLITS[name]:
        raise DataError(f"unknown split {split!r} of {name}; use one of {list(_SPLITS[name])}")
    path = os.path.join(ASSETS, f"{name}.{split}.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: the package was installed without its data assets "
                        "(reinstall, or run scripts/build_docstring_dataset.py and "
                        "scripts/build_chat_dataset.py)")
    return path


def builtin_labels(name: str) -> list[str]:
    """Label names of a builtin classification dataset (index = label id)."""
    if name not in CLASSIFICATION:
        raise DataError(f"unknown builtin dataset {name!r}; builtins: {list(BUILTINS)}")
    with open(os.path.join(ASSETS, "labels.json"), encoding="utf-8") as f:
        return list(json.load(f)["names"])
