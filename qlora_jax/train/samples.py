"""Held-out generations before and after training (``train.samples`` of a causal-LM run).

The prompt of a held-out example is its ids up to its last learned run (for chat data: the
conversation rendered by the checkpoint's chat template up to and including the last
assistant header, i.e. the template's generation prompt), exactly as training saw it; the
reference is that run (the answer and its end-of-turn token). Decoding is greedy and stops at
the checkpoint's end ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def held_out_prompts(dataset: Any, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the first ``count`` examples of a causal-LM dataset."""
    out = []
    for ids, learned in zip(dataset.ids[:count], dataset.learned[:count]):
        learned = np.asarray(learned, bool)
        starts = np.flatnonzero(learned & ~np.concatenate([[False], learned[:-1]]))
        if not len(starts) or starts[-1] == 0:
            continue
        start = int(starts[-1])
        end = start + int(np.argmin(learned[start:])) if not learned[start:].all() else len(ids)
        out.append(([int(i) for i in ids[:start]], [int(i) for i in ids[start:end]]))
    return out


def generate_texts(model: Any, params: Any, tokenizer: Any,
                   prompts: list[tuple[list[int], list[int]]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of the prompts (one left-padded batch), decoded without specials."""
    from qlora_jax.generate import generate

    t = max(len(p) for p, _ in prompts)
    ids = np.full((len(prompts), t), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for i, (p, _) in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    out = np.asarray(generate(model, params, ids, max_new_tokens, attention_mask=mask,
                              pad_token_id=tokenizer.pad_id))
    texts = []
    for row in out[:, t:]:
        texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
    return texts


def prompt_text(tokenizer: Any, ids: list[int]) -> str:
    """The last user turn of a prompt, for display (the whole prompt when it has no turns)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    added = tokenizer.backend.get_added_tokens_decoder().values()
    specials = {t.content for t in added if t.special} | set(tokenizer.special_tokens.values())
    for s in sorted(specials, key=len, reverse=True):
        text = text.replace(s, "\n")
    lines = [ln for ln in text.split("\n") if ln.strip()]
    # Chat prompts end with the assistant header; show the user's message before it.
    for role in ("user", "[INST]"):
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].strip() == role and i + 1 < len(lines):
                return " ".join(lines[i + 1:-1] or lines[i + 1:]).strip()
    return " ".join(lines[-3:]).strip()
