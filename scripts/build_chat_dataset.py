"""Build the ``stdlib_chat`` chat dataset shipped in qlora_jax/data/assets/.

Source: the public functions of the CPython standard library and their docstrings (PSF License
Version 2), read from the ``.py`` files of the interpreter that runs this script with ``ast`` (no
module is imported). Each example is a two-message conversation: the user asks about a function
(one of a few phrasings), the assistant answers in a fixed three-line card,

    Signature: textwrap.dedent(text)
    Summary: Remove any common leading whitespace from every line in `text`.
    Module: textwrap

a style an instruct model does not use by itself, so fine-tuning visibly changes its answers.

Run from the repository root:

    python scripts/build_chat_dataset.py            # writes qlora_jax/data/assets/stdlib_chat.*
    python scripts/build_chat_dataset.py --check    # rebuilds in memory, compares with the files

The build is deterministic for a given standard library: files are walked in sorted order,
examples are ordered by the SHA-256 of their qualified name, and split by that order.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import sysconfig

ASSETS = os.path.join(os.path.dirname(__file__), "..", "qlora_jax", "data", "assets")
NAME = "stdlib_chat"
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "idlelib",
             "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "tkinter", "distutils"}
QUESTIONS = (
    "What does `{name}` do?",
    "Explain the Python function {name}.",
    "Tell me about {name} from the standard library.",
    "How would you describe `{name}` in Python?",
    "What is {name} for?",
)
MAX_ARGS = 60          # characters of the parameter list
SUMMARY = (24, 160)    # characters of the first sentence
SPLIT = {"validation": 60}  # examples; the rest is train
CAP = 1000             # examples in all


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def summary(doc: str) -> str | None:
    """The docstring's first sentence, whitespace collapsed, or None when unsuitable."""
    first = doc.strip().split("\n\n")[0]
    if ">>>" in first or "::" in first:
        return None
    text = " ".join(first.split())
    for m in re.finditer(r"[.!?](?=\s+[A-Z(`'\"])", text):  # a sentence end, not "e.g. (x)"
        if not re.search(r"\b(e\.g|i\.e|etc|vs|cf)$", text[:m.start()]):
            text = text[:m.end()]
            break
    if not SUMMARY[0] <= len(text) <= SUMMARY[1] or not text[0].isupper():
        return None
    return text if text[-1] in ".!?" else text + "."


def iter_functions(root: str):
    """(module, name, parameter list, summary) of public module-level functions."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            module = module_name(root, path)
            if any(part.startswith("_") for part in module.split(".")):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in tree.body:
                if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                    continue
                doc = ast.get_docstring(node)
                text = summary(doc) if doc else None
                args = ast.unparse(node.args)
                if text and len(args) <= MAX_ARGS:
                    yield module, node.name, args, text


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build(root: str) -> dict[str, list[dict]]:
    """Split name -> records."""
    seen, examples = set(), []
    for module, name, args, text in iter_functions(root):
        qualname = f"{module}.{name}"
        if qualname in seen:
            continue
        seen.add(qualname)
        h = _hash(qualname)
        question = QUESTIONS[int(h[:8], 16) % len(QUESTIONS)].format(name=qualname)
        answer = f"Signature: {qualname}({args})\nSummary: {text}\nModule: {module}"
        examples.append((h, {"messages": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}]}))
    examples = [r for _, r in sorted(examples, key=lambda e: e[0])][:CAP]
    n_val = SPLIT["validation"]
    return {"validation": examples[:n_val], "train": examples[n_val:]}


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files")
    args = parser.parse_args()
    root = sysconfig.get_paths()["stdlib"]
    splits = build(root)
    status = 0
    for split, records in splits.items():
        path = os.path.join(ASSETS, f"{NAME}.{split}.jsonl")
        text = _lines(records)
        if args.check:
            with open(path, encoding="utf-8") as f:
                same = f.read() == text
            print(f"{path}: {'same' if same else 'DIFFERS'} ({len(records)} records)")
            status |= not same
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path}: {len(records)} records, {len(text.encode())} bytes")
    print(f"Python {sys.version.split()[0]} stdlib at {root}")
    return status


if __name__ == "__main__":
    sys.exit(main())
