"""Builds experiments/data/smoke.{train,eval}.jsonl: a tiny instruction set for the smoke run.

Records are ``{"prompt": ..., "response": ...}``: the prompt is the opening (up to 120
characters) of a Python standard-library docstring from the shipped ``stdlib_docstrings``
dataset (PSF-2 licensed, see qlora_jax/data/assets/README.md), the response is the name of its module family. The first 160
training examples make the training file, the first 32 validation examples the eval file.
``smoke_tokenizer/`` holds a 512-token byte-level BPE tokenizer trained on the training file
(with ``<s>``, ``</s>`` and ``<pad>``), so the tiny smoke model needs no 30k-token vocabulary.

    python experiments/data/make_smoke_data.py          # rewrites the files (deterministic)
"""

from __future__ import annotations

import json
import os

from qlora_jax.data.builtin import builtin_labels, builtin_path

HERE = os.path.dirname(os.path.abspath(__file__))


def convert(split: str, n: int, out: str) -> None:
    names = builtin_labels("stdlib_docstrings")
    with open(builtin_path("stdlib_docstrings", split), encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:n]
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            text = r["text"] if len(r["text"]) <= 120 else r["text"][:120].rsplit(" ", 1)[0]
            prompt = f"Docstring: {text}\nTopic:"
            f.write(json.dumps({"prompt": prompt, "response": " " + names[r["label"]]}) + "\n")


def train_tokenizer(corpus: str, out_dir: str, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    with open(corpus, encoding="utf-8") as f:
        texts = [v for line in f for v in json.loads(line).values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    convert("train", 160, os.path.join(HERE, "smoke.train.jsonl"))
    convert("validation", 32, os.path.join(HERE, "smoke.eval.jsonl"))
    train_tokenizer(os.path.join(HERE, "smoke.train.jsonl"), os.path.join(HERE, "smoke_tokenizer"))
