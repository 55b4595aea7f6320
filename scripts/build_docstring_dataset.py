"""Build the ``stdlib_docstrings`` classification dataset shipped in qlora_jax/data/assets/.

Source: the docstrings of the CPython standard library (PSF License Version 2), read from the
``.py`` files of the interpreter that runs this script with ``ast`` (no module is imported).
Each example is the opening of one module, class or function docstring, labelled by the family
of the module it comes from (see ``GROUPS``).

Run from the repository root:

    python scripts/build_docstring_dataset.py            # writes qlora_jax/data/assets/
    python scripts/build_docstring_dataset.py --check    # rebuilds in memory, compares with the files

The build is deterministic for a given standard library: files are walked in sorted order, the
examples of a label are ordered by the SHA-256 of their text, capped, and split by that order.
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import json
import math
import os
import platform
import re
import sys
import sysconfig

ASSETS = os.path.join(os.path.dirname(__file__), "..", "qlora_jax", "data", "assets")
NAME = "stdlib_docstrings"

# label name -> (description, module prefixes). A module belongs to the first group one of whose
# prefixes equals its dotted name or a leading part of it ("email" covers "email.mime.text").
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "files_io": (
        "files, paths, streams, archives and compression",
        ("os", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "filecmp", "fileinput", "stat",
         "ntpath", "posixpath", "genericpath", "tarfile", "zipfile", "gzip", "bz2", "lzma",
         "zipapp", "io", "_pyio", "_compression"),
    ),
    "concurrency": (
        "asynchronous I/O, threads, processes and queues",
        ("asyncio", "concurrent", "multiprocessing", "threading", "_threading_local", "queue",
         "selectors", "sched", "subprocess"),
    ),
    "email": (
        "e-mail messages, mailboxes and mail protocols",
        ("email", "mailbox", "smtplib", "imaplib", "poplib", "nntplib", "quopri", "mailcap"),
    ),
    "markup": (
        "XML and HTML processing",
        ("xml", "html"),
    ),
    "networking": (
        "sockets, HTTP, URLs and network servers",
        ("http", "urllib", "wsgiref", "socketserver", "socket", "ssl", "ftplib", "telnetlib",
         "xmlrpc", "ipaddress", "webbrowser", "cgi"),
    ),
    "numbers": (
        "decimal, fractions, statistics and random numbers",
        ("_pydecimal", "decimal", "fractions", "statistics", "numbers", "random", "colorsys"),
    ),
    "testing_debugging": (
        "unit tests, doctests, debuggers, tracing and profiling",
        ("unittest", "doctest", "bdb", "pdb", "trace", "traceback", "timeit", "cProfile",
         "profile", "pstats", "tracemalloc", "faulthandler", "cgitb"),
    ),
    "logging": (
        "the logging framework",
        ("logging",),
    ),
}

SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_CHARS = 40        # shorter docstring openings carry too little signal
MIN_WORDS = 6
MAX_CHARS = 400       # about 100 MiniLM tokens
MAX_PER_LABEL = 320   # cap to keep the labels roughly balanced
EVAL_FRACTION = 0.1   # validation and test each

# Names that would give a label away, matched as whole words (case-insensitive). Dotted names of
# any grouped module ("email.message", "os.path") are matched separately below.
LEAKY_WORDS = (
    "asyncio", "tkinter", "unittest", "doctest", "pdb", "bdb", "pathlib", "shutil", "tarfile",
    "zipfile", "gzip", "bz2", "lzma", "multiprocessing", "threading", "subprocess", "smtplib",
    "imaplib", "poplib", "nntplib", "mailbox", "minidom", "pulldom", "expatbuilder", "elementtree",
    "etree", "sax", "expat", "xmlrpc", "urllib", "wsgiref", "socketserver", "ftplib", "telnetlib",
    "ipaddress", "_pydecimal", "statistics", "tracemalloc", "pstats", "cprofile", "timeit",
    "logging", "quopri", "mailcap", "selectors", "fileinput", "fnmatch", "filecmp", "tempfile",
)


def module_name(root: str, path: str) -> str:
    """Dotted module name of a stdlib file ("email/mime/text.py" -> "email.mime.text")."""
    rel = os.path.relpath(path, root)[: -len(".py")]
    parts = rel.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def group_of(module: str) -> str | None:
    """Label name of a module, or None when it belongs to no group."""
    for label, (_, prefixes) in GROUPS.items():
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return label
    return None


def iter_docstrings(root: str):
    """Yields (module, qualified object name, docstring) for every grouped stdlib file."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            module = module_name(root, path)
            if group_of(module) is None:
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
            yield from _walk(tree, module, module)


def _walk(node: ast.AST, module: str, qualname: str):
    doc = ast.get_docstring(node, clean=True) if isinstance(
        node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if doc:
        yield module, qualname, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk(child, module, f"{qualname}.{child.name}")


def _leak_patterns() -> re.Pattern:
    dotted = sorted({p for _, prefixes in GROUPS.values() for p in prefixes}, key=len, reverse=True)
    words = "|".join(re.escape(w) for w in LEAKY_WORDS)
    dots = "|".join(re.escape(p) for p in dotted)
    # A leaky word anywhere, or a grouped module used as a dotted name ("os.path", "email.utils").
    return re.compile(rf"\b(?:{words})\b|(?<![\w.])(?:{dots})\.[A-Za-z_]", re.IGNORECASE)


LEAK = _leak_patterns()


def clean_text(doc: str) -> str | None:
    """The opening of a docstring with leaky lines dropped, or None when too little remains.

    Takes paragraphs (blank-line separated) until MAX_CHARS, stops at the first doctest or
    indented code block, drops every line that names a grouped module, collapses whitespace and
    cuts at a word boundary.
    """
    kept: list[str] = []
    size = 0
    for paragraph in doc.split("\n\n"):
        lines = paragraph.strip("\n").split("\n")
        if any(line.lstrip().startswith(">>>") for line in lines) or lines[0].startswith("    "):
            break
        lines = [line for line in lines if line.strip() and not LEAK.search(line)]
        if not lines:
            continue
        text = " ".join(" ".join(lines).split())
        kept.append(text)
        size += len(text) + 1
        if size >= MAX_CHARS:
            break
    text = " ".join(kept)
    if len(text) > MAX_CHARS:
        cut = text.rfind(" ", 0, MAX_CHARS)
        text = text[: cut if cut > 0 else MAX_CHARS]
    if len(text) < MIN_CHARS or len(text.split()) < MIN_WORDS:
        return None
    return text


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build(root: str) -> tuple[dict[str, list[dict]], dict]:
    """Builds the splits in memory. Returns ({split: examples}, stats)."""
    labels = list(GROUPS)
    by_text: dict[str, set[str]] = collections.defaultdict(set)
    raw = collections.Counter()
    for module, _, doc in iter_docstrings(root):
        label = group_of(module)
        raw[label] += 1
        text = clean_text(doc)
        if text is not None:
            by_text[text].add(label)
    # Deduplicate: a text seen under one label once; a text seen under several labels is dropped.
    per_label: dict[str, list[str]] = {label: [] for label in labels}
    ambiguous = 0
    for text, owners in by_text.items():
        if len(owners) == 1:
            per_label[next(iter(owners))].append(text)
        else:
            ambiguous += 1
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    stats = {"raw_docstrings": dict(raw), "ambiguous_dropped": ambiguous, "per_label": {}}
    for index, label in enumerate(labels):
        texts = sorted(per_label[label], key=_key)
        available = len(texts)
        texts = texts[:MAX_PER_LABEL]
        n_eval = max(1, round(len(texts) * EVAL_FRACTION))
        parts = {"test": texts[:n_eval], "validation": texts[n_eval:2 * n_eval],
                 "train": texts[2 * n_eval:]}
        for split, chunk in parts.items():
            splits[split] += [{"text": t, "label": index, "label_name": label} for t in chunk]
        stats["per_label"][label] = {"unique_texts": available,
                                     **{split: len(chunk) for split, chunk in parts.items()}}
    for split in splits:
        splits[split].sort(key=lambda ex: _key(ex["text"]))
    return splits, stats


def baseline(splits: dict[str, list[dict]]) -> dict[str, float]:
    """Accuracy of a bag-of-words nearest-centroid classifier (TF-IDF, cosine) per eval split.

    A reference point for the difficulty of the task: chance is about 1/8, this shallow lexical
    baseline is well below 100%, a fine-tuned encoder should beat it.
    """
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    train = splits["train"]
    df = collections.Counter(w for ex in train for w in set(words(ex["text"])))
    idf = {w: math.log(len(train) / n) for w, n in df.items()}

    def vector(text: str) -> dict[str, float]:
        tf = collections.Counter(w for w in words(text) if w in idf)
        v = {w: c * idf[w] for w, c in sorted(tf.items())}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    centroids: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for ex in train:
        centroids[ex["label"]].update(vector(ex["text"]))
    scores = {}
    for split in ("validation", "test"):
        hits = 0
        for ex in splits[split]:
            v = vector(ex["text"])
            sims = {}
            for label in sorted(centroids):
                c = centroids[label]
                norm = math.sqrt(sum(x * x for x in c.values()))
                sims[label] = sum(x * c.get(w, 0.0) for w, x in v.items()) / norm
            hits += max(sims, key=lambda k: (sims[k], -k)) == ex["label"]
        scores[split] = hits / len(splits[split])
    return scores


def render(splits: dict[str, list[dict]], stats: dict) -> dict[str, str]:
    """File name -> file content of everything written to the assets folder."""
    files = {}
    for split, examples in splits.items():
        files[f"{NAME}.{split}.jsonl"] = "".join(
            json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples)
    files["labels.json"] = json.dumps(
        {"names": list(GROUPS),
         "descriptions": {k: v[0] for k, v in GROUPS.items()},
         "modules": {k: list(v[1]) for k, v in GROUPS.items()}}, indent=1) + "\n"
    files["README.md"] = _readme(splits, stats)
    return files


def _readme(splits: dict[str, list[dict]], stats: dict) -> str:
    version = platform.python_version()
    rows = []
    for label, s in stats["per_label"].items():
        index = list(GROUPS).index(label)
        rows.append(f"| {index} | `{label}` | {GROUPS[label][0]} | {s['train']} | "
                    f"{s['validation']} | {s['test']} |")
    totals = {split: len(ex) for split, ex in splits.items()}
    scores = baseline(splits)
    majority = max(collections.Counter(ex["label"] for ex in splits["test"]).values())
    rows.append(f"| | **total** | | {totals['train']} | {totals['validation']} | {totals['test']} |")
    return f"""# stdlib_docstrings

A small text classification dataset: the opening of a docstring from the Python standard library,
labelled by the family of the module it comes from. It is the dataset of the quickstart
(`experiments/quickstart.py`), small enough to ship in the repository and to fine-tune a MiniLM
encoder on in minutes on a CPU. (The chat dataset of the chat quickstart, `stdlib_chat`, is
described in `stdlib_chat.md`.)

## Source and license

Docstrings of the CPython {version} standard library (`Lib/*.py`), Copyright (c) 2001 Python
Software Foundation; All Rights Reserved, distributed under the PSF License Version 2
(https://docs.python.org/3/license.html), which permits redistribution of derived works with the
copyright notice kept. Files under `test/`, `tests/`, `idle_test/` and `site-packages/` are not
used.

## How it was built

`python scripts/build_docstring_dataset.py` (deterministic; `--check` verifies these files):

1. Parse every `.py` file of the stdlib with `ast` (nothing is imported) and take the docstring of
   each module, class, function and method whose module belongs to one of the groups below
   (`labels.json` lists the modules of each group).
2. Text = the docstring's paragraphs until {MAX_CHARS} characters, stopping at doctests and code
   blocks, with whitespace collapsed and cut at a word boundary. Every line that names a module of a
   group (e.g. `asyncio`, `email.message`, `os.path`) is dropped, so the label does not leak through
   the module name. Openings under {MIN_CHARS} characters or {MIN_WORDS} words are dropped.
3. Exact duplicate texts are kept once; texts that occur under two labels are dropped
   ({stats['ambiguous_dropped']} of them).
4. Per label, texts are ordered by the SHA-256 of their UTF-8 bytes, capped at {MAX_PER_LABEL}, and
   the first 10% go to `test`, the next 10% to `validation`, the rest to `train` (stratified, so
   every label is in every split). Each split file is ordered by the same hash.

## Files

- `{NAME}.train.jsonl`, `{NAME}.validation.jsonl`, `{NAME}.test.jsonl`: one JSON object a line,
  `{{"text": str, "label": int, "label_name": str}}`.
- `labels.json`: `names` (index = label id), `descriptions`, `modules`.

## Counts

| id | label | what it covers | train | validation | test |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## Difficulty

Always answering the largest label scores {majority / totals['test']:.1%} on `test`. A bag-of-words
nearest-centroid classifier (TF-IDF over lowercase words, cosine similarity; `baseline()` in the
build script) scores {scores['validation']:.1%} on `validation` and {scores['test']:.1%} on `test`.
Many openings are generic method descriptions (reading, closing, returning a value) that could
sit in several families, so no classifier reaches 100%; a fine-tuned encoder should beat the
lexical baseline.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=ASSETS, help="output folder (default: the package assets)")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in memory and fail if the files in --out differ")
    args = parser.parse_args()
    root = sysconfig.get_paths()["stdlib"]
    splits, stats = build(root)
    files = render(splits, stats)
    if args.check:
        stale = []
        for name, content in files.items():
            path = os.path.join(args.out, name)
            if not os.path.exists(path) or open(path, encoding="utf-8").read() != content:
                stale.append(name)
        if stale:
            print(f"differs from a fresh build (Python {platform.python_version()}): {stale}")
            return 1
        print("assets match a fresh build")
        return 0
    os.makedirs(args.out, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write(content)
    total = sum(len(c.encode("utf-8")) for c in files.values())
    print(json.dumps({"python": sys.version.split()[0], "stdlib": root, "bytes": total,
                      **{s: len(e) for s, e in splits.items()}, **stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
