"""File formats read and written below the checkpoint and data layers (no model code here).

``gguf``: llama.cpp's GGUF container (metadata, tensor names, dequantization, the q/k row
permutation); ``gguf_vocab``: a GGUF tokenizer's metadata <-> a ``tokenizers.Tokenizer``.
Both ``qlora_jax.checkpoints`` and ``qlora_jax.data`` import from here; this package imports
neither.
"""
