"""The shipped stdlib_docstrings dataset: files, counts, labels in every split, size, no leaks."""

from __future__ import annotations

import collections
import json
import os
import platform
import re
import subprocess
import sys

import pytest

from qlora_jax import data
from qlora_jax.data.builtin import ASSETS

SPLITS = ("train", "validation", "test")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _split(name):
    with open(os.path.join(ASSETS, f"stdlib_docstrings.{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _documented_counts():
    """{label: (train, validation, test)} from the README's table."""
    with open(os.path.join(ASSETS, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| [^|]+ \| (\d+) \| (\d+) \| (\d+) \|$", readme, re.M)
    return {name: tuple(map(int, counts)) for _, name, *counts in rows}, readme


def test_files_parse_with_documented_counts():
    names = json.load(open(os.path.join(ASSETS, "labels.json")))["names"]
    assert 6 <= len(names) <= 10
    documented, readme = _documented_counts()
    assert list(documented) == names
    assert "PSF License Version 2" in readme and "CPython" in readme
    counts = {s: collections.Counter() for s in SPLITS}
    texts = set()
    for s_index, split in enumerate(SPLITS):
        for ex in _split(split):
            assert set(ex) == {"text", "label", "label_name"}
            assert names[ex["label"]] == ex["label_name"]
            assert isinstance(ex["text"], str) and len(ex["text"]) >= 40
            assert ex["text"] not in texts, "duplicate text"
            texts.add(ex["text"])
            counts[split][ex["label_name"]] += 1
    for name in names:
        got = tuple(counts[s][name] for s in SPLITS)
        assert got == documented[name], name
        assert min(got) > 0, f"{name} missing from a split"


def test_total_size_under_2mb():
    total = sum(os.path.getsize(os.path.join(ASSETS, f)) for f in os.listdir(ASSETS))
    assert total < 2 * 1024 * 1024


def test_module_names_do_not_leak():
    leaky = re.compile(r"\b(asyncio|unittest|doctest|tkinter|xmlrpc|urllib|smtplib|_pydecimal|"
                       r"multiprocessing|pathlib|shutil)\b|\b(email|xml|os|logging)\.\w", re.I)
    for split in SPLITS:
        for ex in _split(split):
            assert not leaky.search(ex["text"]), ex["text"]


def test_builds_for_minilm(minilm_tok):
    train, evaluation = data.datasets_from_config(data.default_config(), minilm_tok, 64)
    assert train.num_labels == evaluation.num_labels == 8
    assert len(train) == len(_split("train")) and len(evaluation) == len(_split("validation"))
    test = data.build_dataset("stdlib_docstrings", minilm_tok, 64, split="test")
    assert len(test) == len(_split("test"))
    batch = next(data.TrainLoader(train, 16, 0))
    assert batch["input_ids"].shape == (16, 64) and batch["labels"].max() < 8


def test_builtin_and_config_errors(minilm_tok):
    with pytest.raises(data.DataError, match="unknown split 'dev'"):
        data.build_dataset("stdlib_docstrings", minilm_tok, 64, split="dev")
    with pytest.raises(data.DataError, match="not found"):
        data.build_dataset("stdlib_docstring", minilm_tok, 64)
    with pytest.raises(data.DataError, match=r"unknown data config keys \['pth'\]"):
        data.datasets_from_config({"pth": "x"}, minilm_tok, 64)


@pytest.mark.skipif(platform.python_version() != "3.11.7",
                    reason="the assets were built from the CPython 3.11.7 standard library")
@pytest.mark.parametrize("name", ["build_docstring_dataset", "build_chat_dataset"])
def test_build_script_reproduces_the_assets(name):
    script = os.path.join(REPO, "scripts", f"{name}.py")
    result = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stdlib_chat_builtin(tmp_path):
    from tests.data.test_chat_template import FORMATS, _plain, _tokenizer_dir

    template, specials = FORMATS["qwen2.5"]
    tok = data.load_tokenizer(_tokenizer_dir(str(tmp_path), _plain(template), specials))
    train, evaluation = data.datasets_from_config({"path": "stdlib_chat"}, tok, 512)
    assert (len(train), len(evaluation)) == (777, 60) and train.format == "chat"
    for ds in (train, evaluation):
        for ids, learned in zip(ds.ids[:20], ds.learned[:20]):
            card = tok.decode([i for i, m in zip(ids, learned) if m])
            lines = card.split("\n")
            assert [ln.split(":")[0] for ln in lines] == ["Signature", "Summary", "Module"], card
    with pytest.raises(data.DataError, match="unknown split 'test'"):
        data.build_dataset("stdlib_chat", tok, 64, split="test")
