"""Held-out prompts for the before/after generations: the template's generation prompt and the
answer, cut from the tokenised examples."""

from __future__ import annotations

from qlora_jax import data
from qlora_jax.train import samples
from tests.data.conftest import random_sentence


def test_held_out_prompts_are_generation_prompts(tmp_path, rng):
    from tests.data.test_chat_template import FORMATS, _plain, _tokenizer_dir

    template, specials = FORMATS["qwen2.5"]
    tok = data.load_tokenizer(_tokenizer_dir(str(tmp_path), _plain(template), specials))
    chats = []
    for turns in (1, 2, 3):
        messages = []
        for _ in range(turns):
            messages += [{"role": "user", "content": random_sentence(rng) + "?"},
                         {"role": "assistant", "content": random_sentence(rng) + "."}]
        chats.append(messages)
    ids, learned = zip(*(data.apply_chat_template(tok, m) for m in chats))
    ds = data.InstructDataset([list(i) for i in ids], [list(map(bool, m)) for m in learned], 512,
                              tok.pad_id)
    got = samples.held_out_prompts(ds, 2)
    assert len(got) == 2
    for (prompt, reference), messages in zip(got, chats):
        want = data.apply_chat_template(tok, messages[:-1], add_generation_prompt=True)[0]
        assert prompt == want
        assert tok.decode(reference, skip_special_tokens=False) == (
            messages[-1]["content"] + "<|im_end|>")
        assert samples.prompt_text(tok, prompt) == messages[-2]["content"]
