"""Fixtures shared with tests/models (tiny transformers checkpoints)."""

from tests.models.conftest import llama_ckpt  # noqa: F401
