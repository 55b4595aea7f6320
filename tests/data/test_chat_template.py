"""Chat templates: rendering and ids equal transformers' apply_chat_template; the loss mask.

Oracles: ``transformers.AutoTokenizer.apply_chat_template`` for the ids (SmolLM2's real template,
and hand-written Llama-3, Mistral and Qwen2.5 style templates on the smoke tokenizer with their
special tokens added), and for the loss mask transformers' ``return_assistant_tokens_mask`` on
the same templates with ``{% generation %}`` blocks around each assistant turn's content and
end-of-turn token.
"""

from __future__ import annotations

import json
import os

import pytest
import tokenizers

from qlora_jax import data
from qlora_jax.data import chat_template as ct
from tests.data.conftest import random_sentence

transformers = pytest.importorskip("transformers")

SMOKE_TOK = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "data",
                         "smoke_tokenizer", "tokenizer.json")
CONTROL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]

# Written for these tests in the formats of the three families; G( and )G mark where the tagged
# variant puts {% generation %} / {% endgeneration %}.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}G({{ message['content'] | trim + '<|eot_id|>' }})G"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}"
    "{% endif %}{{ bos_token }}{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}"
    "{% if loop.first %}{% set text = system + message['content'] %}"
    "{% else %}{% set text = message['content'] %}{% endif %}"
    "{{ '[INST] ' + text + ' [/INST]' }}"
    "{% else %}{{ ' ' }}G({{ message['content'] + eos_token }})G{% endif %}{% endfor %}")
QWEN25 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}"
    "{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(turns=0) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set ns.turns = ns.turns + 1 %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "G({{- message.content + '<|im_end|>' }})G{{- '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
FORMATS = {
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}),
    "qwen2.5": (QWEN25, {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}),
}


def _plain(template: str) -> str:
    return template.replace("G(", "").replace(")G", "")


def _tagged(template: str) -> str:
    return template.replace("G(", "{% generation %}").replace(")G", "{% endgeneration %}")


def _tokenizer_dir(directory: str, template: str, specials: dict[str, str]) -> str:
    tok = tokenizers.Tokenizer.from_file(SMOKE_TOK)
    tok.add_special_tokens(CONTROL)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({**specials, "chat_template": template}, f)
    return directory


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _conversation(rng, turns: int, system: bool, last_assistant: bool = True) -> list[dict]:
    def text():  # random words with stray spaces and newlines around them, now and then
        pad = ["", " ", "\n", "  "]
        return (pad[int(rng.integers(4))] + random_sentence(rng, 1, 10) + "."
                + pad[int(rng.integers(4))])

    messages = [{"role": "system", "content": text()}] if system else []
    for _ in range(turns):
        messages += [{"role": "user", "content": text()},
                     {"role": "assistant", "content": text()}]
    return messages if last_assistant else messages[:-1]


@pytest.fixture(scope="module", params=sorted(FORMATS))
def family(request, tmp_path_factory):
    """(name, our tokenizer, transformers' tokenizer, transformers' on the tagged template)."""
    template, specials = FORMATS[request.param]
    root = tmp_path_factory.mktemp(request.param.replace(".", ""))
    plain = _tokenizer_dir(str(root / "plain"), _plain(template), specials)
    tagged = _tokenizer_dir(str(root / "tagged"), _tagged(template), specials)
    return (request.param, data.load_tokenizer(plain),
            transformers.AutoTokenizer.from_pretrained(plain),
            transformers.AutoTokenizer.from_pretrained(tagged), data.load_tokenizer(tagged))


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("gen", [False, True])
def test_family_templates_equal_transformers(family, rng, system, gen):
    name, ours, ref, ref_tagged, ours_tagged = family
    for turns in (1, 3):
        for last_assistant in (True, False):
            messages = _conversation(rng, turns, system, last_assistant)
            ids, mask = data.apply_chat_template(ours, messages, add_generation_prompt=gen)
            assert ids == _ids(ref.apply_chat_template(messages, tokenize=True,
                                                      add_generation_prompt=gen))
            # The loss mask equals transformers' assistant mask of the {% generation %} variant.
            out = ref_tagged.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=gen,
                                                 return_assistant_tokens_mask=True)
            assert _ids(out) == ids
            assert mask == list(out["assistant_masks"]), name
            # Our rendering of the tagged template takes the spans from its blocks: same mask.
            assert data.apply_chat_template(ours_tagged, messages, gen) == (ids, mask)
            n_assistant = sum(m["role"] == "assistant" for m in messages)
            runs = sum(1 for i, v in enumerate(mask) if v and (i == 0 or not mask[i - 1]))
            assert runs == n_assistant


def test_smollm2_real_template(smollm2_tok_dir, rng):
    ours = data.load_tokenizer(smollm2_tok_dir)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_tok_dir)
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    end = ours.token_to_id("<|im_end|>")
    for system in (False, True):
        for gen in (False, True):
            for turns in (1, 2, 3):
                messages = _conversation(rng, turns, system)
                messages[-1]["content"] += " Café: naïve — 東京 ✓"
                ids, mask = data.apply_chat_template(ours, messages, add_generation_prompt=gen)
                assert ids == _ids(ref.apply_chat_template(messages, tokenize=True,
                                                          add_generation_prompt=gen))
                # Learned: each assistant content (as given) and its <|im_end|>, nothing else;
                # a token that joins the header's "\n" to the content's first spaces counts.
                runs, run = [], []
                for t, m in zip(ids + [None], mask + [0]):
                    if m:
                        run.append(t)
                    elif run:
                        runs, run = runs + [ours.decode(run, False)], []
                answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
                assert len(runs) == len(answers)
                for got, want in zip(runs, answers):
                    assert got.endswith(want) and not got[:-len(want)].strip(), (got, want)
                learned = [t for t, m in zip(ids, mask) if m]
                assert learned.count(end) == turns
    # The generation prompt is the training text up to the last answer's content.
    messages = _conversation(rng, 2, True)
    full, mask = data.apply_chat_template(ours, messages)
    prompt, prompt_mask = data.apply_chat_template(ours, messages[:-1], add_generation_prompt=True)
    assert full[:len(prompt)] == prompt and not mask[len(prompt) - 1] and mask[len(prompt)]
    assert sum(prompt_mask) == sum(mask[:len(prompt)])


def test_smollm2_template_through_our_gguf_loader(smollm2_tok_dir, rng):
    from tests.data.conftest import smollm2_gguf

    ours = data.load_tokenizer(smollm2_gguf())  # tokenizer and template from the GGUF metadata
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_tok_dir)
    assert ours.chat_template == ref.chat_template
    for system, gen in ((False, True), (True, False)):
        messages = _conversation(rng, 2, system)
        ids, mask = data.apply_chat_template(ours, messages, add_generation_prompt=gen)
        assert ids == _ids(ref.apply_chat_template(messages, tokenize=True,
                                                  add_generation_prompt=gen))
        assert sum(mask) > 0


def test_chat_template_sources(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    d = _tokenizer_dir(str(tmp_path / "list"), "", {"eos_token": "</s>"})
    cfg_path = os.path.join(d, "tokenizer_config.json")
    with open(cfg_path, "w") as f:  # a named list: "default" is used
        json.dump({"eos_token": "</s>", "chat_template": [
            {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": template}]}, f)
    assert data.load_tokenizer(d).chat_template == template
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:  # the file wins
        f.write("FILE {{ messages | length }}")
    tok = data.load_tokenizer(d)
    assert tok.chat_template == "FILE {{ messages | length }}"
    assert ct.render(tok.chat_template, [{"role": "user", "content": "x"}])[0] == "FILE 1"
    os.remove(os.path.join(d, "chat_template.jinja"))
    with open(cfg_path, "w") as f:
        json.dump({"chat_template": [{"name": "tool_use", "template": "T"}]}, f)
    with pytest.raises(data.DataError, match="none named 'default'"):
        data.load_tokenizer(d)
    with open(cfg_path, "w") as f:
        json.dump({"eos_token": "</s>"}, f)
    tok = data.load_tokenizer(d)
    assert tok.chat_template is None
    with pytest.raises(data.DataError, match="no chat template"):
        data.apply_chat_template(tok, [{"role": "user", "content": "x"}])


def test_globals_filters_and_errors():
    msgs = [{"role": "user", "content": "é <b>"}, {"role": "assistant", "content": None}]
    text, _ = ct.render("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}"
                        "|{{ tools is none }}|{{ documents is none }}|{{ bos_token }}"
                        "|{{ strftime_now('%Y') | length }}", msgs,
                        special_tokens={"bos_token": "<s>"})
    ref = transformers.utils.chat_template_utils.render_jinja_template(
        [msgs], chat_template="{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}"
        "|{{ tools is none }}|{{ documents is none }}|{{ bos_token }}"
        "|{{ strftime_now('%Y') | length }}", bos_token="<s>")[0][0]
    # transformers drops None-valued keys before rendering (in apply_chat_template).
    assert text == ref.replace(', "content": null', "")
    assert '"é <b>"' in text and "\n  " in text and text.endswith("|True|True|<s>|4")
    with pytest.raises(data.DataError, match="refused the conversation: roles must alternate"):
        ct.render("{{ raise_exception('roles must alternate') }}", msgs)
    with pytest.raises(data.DataError, match="not valid Jinja"):
        ct.render("{% for m in messages %}", msgs)
    with pytest.raises(data.DataError, match="refused"):  # the sandbox holds
        ct.render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", msgs)
    with pytest.raises(data.DataError, match="refused"):
        ct.render("{% set ns = namespace() %}{% set ns._x = 1 %}", msgs)
    assert ct.render("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                     "{{ m.role }}{% endfor %}", msgs)[0] == "assistant"
    with pytest.raises(data.DataError, match="role"):
        ct.render("x", [{"content": "no role"}])


def test_mistral_refuses_bad_roles(tmp_path):
    ours = data.load_tokenizer(_tokenizer_dir(str(tmp_path), _plain(MISTRAL), FORMATS["mistral"][1]))
    with pytest.raises(data.DataError, match="roles must alternate"):
        data.apply_chat_template(ours, [{"role": "user", "content": "a"},
                                        {"role": "user", "content": "b"}])
