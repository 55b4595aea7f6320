"""A checkpoint's Jinja chat template, rendered and tokenised as `transformers` does.

    ids, loss_mask = apply_chat_template(tok, messages)                      # a training example
    prompt_ids, _ = apply_chat_template(tok, messages[:-1], add_generation_prompt=True)

Rendering follows ``transformers``' ``apply_chat_template``: a sandboxed Jinja environment
(``ImmutableSandboxedEnvironment``, ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols``
extension and the ``{% generation %}`` block), the globals ``raise_exception``, ``strftime_now``,
``namespace`` and ``dict``, its ``tojson`` filter (no ASCII escaping, ``indent``,
``separators``, ``sort_keys``), and the variables ``messages``, ``add_generation_prompt``,
``tools`` and ``documents`` (None) and the named special tokens (``bos_token``, ``eos_token``,
``unk_token``, ``pad_token``, ... as strings, each only when the checkpoint names it). The text is
tokenised without adding special tokens (special tokens written by the template become their
ids), so the ids equal ``AutoTokenizer.apply_chat_template(messages, tokenize=True)``.

The loss mask marks every assistant turn: its content and the end-of-turn text the template
writes after it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...), not the whitespace the template
writes around the turn.
A template with ``{% generation %}`` blocks says itself which text is the assistant's; for any
other template, assistant turn ``i`` is found by rendering prefixes of the conversation: it
starts where the rendering of ``messages[:i]`` with the generation prompt stops agreeing with
the full text, and ends where the rendering of ``messages[:i + 1]`` does. This needs no
assumption about the format and survives templates that trim or rewrite the content; each
turn's characters map to the tokens that overlap them (token offsets).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from qlora_jax.data.errors import DataError

# Private-use characters around the output of a {% generation %} block (removed after rendering).
_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text (transformers' extension)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        return _GEN_OPEN + caller() + _GEN_CLOSE


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` without underscore attributes (no route to Python internals)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set underscore attributes on a namespace ({name!r})")


class _Dict:
    """The template's ``dict(...)``: builds plain dicts, exposes nothing else."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by source).

    Raises:
        DataError: the template is not valid Jinja.
    """
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})"
                        ) from None


def _plain(value: Any) -> Any:
    """JSON-like data only (what a template may see); other objects become a placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain dicts without None values (as transformers passes them).

    Raises:
        DataError: not a list of dicts with a string ``role``.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                        f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise DataError(f"message {i} must be a dict with a string 'role', got {m!r:.80}")
        out.append({k: _plain(v) for k, v in m.items() if v is not None})
    for m in out:
        if any(_GEN_OPEN in s or _GEN_CLOSE in s for s in _strings(m)):
            raise DataError("messages may not contain the private-use characters U+E000/U+E001 "
                            "(they mark {% generation %} blocks while rendering)")
    return out


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def render(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str] | None = None, **variables: Any
           ) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation.

    Args:
        template: the Jinja source.
        messages: [{"role": ..., "content": ...}, ...].
        add_generation_prompt: append the header that opens an assistant turn.
        special_tokens: ``{"bos_token": "<s>", ...}``, the variables a template may use.
        **variables: further template variables (they win over special tokens).

    Returns:
        (text, spans): the rendered text and the character spans of its ``{% generation %}``
        blocks (empty when the template has none).

    Raises:
        DataError: the template raised (``raise_exception``) or failed.
    """
    compiled = compile_template(template)
    context = {**dict(special_tokens or {}), **_plain(variables)}
    context.update(messages=normalize_messages(messages), tools=context.get("tools"),
                   documents=context.get("documents"),
                   add_generation_prompt=bool(add_generation_prompt))
    try:
        marked = compiled.render(**context)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the chat template refused the conversation: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise DataError(f"the chat template failed on the conversation: "
                        f"{type(e).__name__}: {e}") from None
    text, spans, start = [], [], None
    pos = 0
    for ch in marked:
        if ch == _GEN_OPEN:
            start = pos
        elif ch == _GEN_CLOSE:
            if start is not None:
                spans.append((start, pos))
            start = None
        else:
            text.append(ch)
            pos += 1
    return "".join(text), spans


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def assistant_spans(template: str, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = False,
                    special_tokens: Mapping[str, str] | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans the loss is taken on (see the module doc)."""
    messages = normalize_messages(messages)
    full, spans = render(template, messages, add_generation_prompt, special_tokens)
    if spans:  # the template's own {% generation %} blocks
        return full, [(a, b) for a, b in spans if b > a]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, _ = render(template, messages[:i], True, special_tokens)
        through, _ = render(template, messages[:i + 1], False, special_tokens)
        start, end = _common_prefix(full, before), _common_prefix(full, through)
        piece = full[start:end]
        # Whitespace the template writes before the content (Mistral's " " after [/INST]) and
        # after the end token (the "\n" after <|im_end|>) is scaffolding; the content's own
        # leading whitespace is kept when the content is found right there.
        lead = len(piece) - len(piece.lstrip())
        content = m.get("content")
        skip = lead
        if isinstance(content, str):
            for c in (content, content.strip()):
                at = piece.find(c) if c else -1
                if 0 <= at <= lead:
                    skip = at
                    break
        start, end = start + skip, start + len(piece.rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def apply_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                        add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """The checkpoint's chat template applied to a conversation, tokenised.

    Args:
        tokenizer: a `qlora_jax.data.Tokenizer` whose checkpoint has a chat template.
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        add_generation_prompt: end with the header of a new assistant turn (for generation).

    Returns:
        (ids, loss_mask): the ids transformers' ``apply_chat_template(messages, tokenize=True)``
        gives, and 1 on every token of an assistant turn's content and end-of-turn token(s),
        0 elsewhere.

    Raises:
        DataError: the tokenizer has no chat template, or the template refuses the messages.
    """
    template = tokenizer.chat_template
    if not template:
        raise DataError("this tokenizer has no chat template (no chat_template in "
                        "tokenizer_config.json, no chat_template.jinja, no GGUF metadata)")
    text, spans = assistant_spans(template, messages, add_generation_prompt,
                                  tokenizer.special_tokens)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [0] * len(encoding.ids)
    k = 0
    for t, (a, b) in enumerate(encoding.offsets):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if b > spans[k][0] and b > a:
            mask[t] = 1
    return list(encoding.ids), mask
