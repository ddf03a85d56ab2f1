"""A request's prompt as the engine will see it: token ids with the model's own tokenizer, or
characters when the router has none.

vLLM tokenises a completions ``prompt`` string with the tokenizer's special tokens
(``add_special_tokens=True``, e.g. a BOS) and takes token-id prompts as they are. For chat it
renders the model's chat template (jinja, from ``tokenizer_config.json`` or
``chat_template.jinja``) and tokenises the text without adding special tokens (the template has
them). ``PromptTokenizer`` does the same with the HF ``tokenizers`` library, so the ids match the
engine's and prefix keys match its KV events. What it cannot reproduce (images and other
non-text parts, a ``--chat-template`` given to the engine, a template that fails here) falls
back to characters: lengths are then estimates (characters / 4) and only the router's own view
of what it sent (``prefix.SentIndex``) can match the prompt.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import msgspec

from vllm_hetero_pd.router.config import ConfigError

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # BPE vocabularies average about 4 characters of English text per token


class TokenizerError(ConfigError):
    """The tokenizer named in the router's config cannot be loaded."""


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    """``units`` are token ids when ``exact``, else the prompt's characters (as code points);
    ``num_tokens`` is exact or estimated accordingly. ``salt`` is the request's ``cache_salt``."""

    units: tuple[int, ...]
    exact: bool
    num_tokens: int
    salt: str | None = None


class PromptTokenizer:
    """The model's tokenizer and chat template, loaded once from the model directory."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        directory = path.parent if path.is_file() else path
        file = path if path.is_file() else path / "tokenizer.json"
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library raises plain Exception subclasses
            raise TokenizerError(f"cannot load tokenizer {file}: {exc}; pass the model directory holding "
                                 "tokenizer.json") from None
        self._config = _read_json(directory / "tokenizer_config.json")
        self._template = self._load_template(directory)

    def _load_template(self, directory: Path):
        source = None
        if (directory / "chat_template.jinja").is_file():
            source = (directory / "chat_template.jinja").read_text()
        elif isinstance(self._config.get("chat_template"), str):
            source = self._config["chat_template"]
        elif isinstance(self._config.get("chat_template"), list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in self._config["chat_template"] if isinstance(t, dict)}
            source = named.get("default")
        if source is None:
            return None
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(source)
        except Exception as exc:
            logger.warning("chat template of %s does not compile here (%s); chat prompts are estimated", directory,
                           exc)
            return None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def completion(self, prompt: Any) -> Prompt | None:
        """A single completions prompt (string or token ids); None if it is neither."""
        if isinstance(prompt, str):
            ids = self.encode(prompt, add_special_tokens=True)
            return Prompt(units=tuple(ids), exact=True, num_tokens=len(ids))
        return _token_prompt(prompt)

    def chat(self, body: dict[str, Any]) -> Prompt | None:
        """The chat request rendered with the model's template and tokenised; None if that fails."""
        if self._template is None:
            return None
        messages = _text_messages(body.get("messages"))
        if messages is None:
            return None
        kwargs = body.get("chat_template_kwargs") if isinstance(body.get("chat_template_kwargs"), dict) else {}
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False), tools=body.get("tools"),
                bos_token=_token_text(self._config.get("bos_token")),
                eos_token=_token_text(self._config.get("eos_token")), **kwargs)
        except Exception as exc:
            logger.debug("chat template failed for a request (%s); its prompt is estimated", exc)
            return None
        ids = self.encode(text, add_special_tokens=False)
        return Prompt(units=tuple(ids), exact=True, num_tokens=len(ids))


def prompt_of(body: dict[str, Any], chat: bool, tokenizer: PromptTokenizer | None) -> Prompt:
    """One prompt of a parsed request (a fanned-out part has one), exact when it can be."""
    salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
    found = None
    if chat:
        if tokenizer is not None:
            found = tokenizer.chat(body)
        if found is None:
            found = _chars(_chat_text(body.get("messages")))
    else:
        prompt = body.get("prompt")
        if tokenizer is not None:
            found = tokenizer.completion(prompt)
        else:
            found = _token_prompt(prompt)
        if found is None:
            found = _chars(prompt if isinstance(prompt, str) else msgspec.json.encode(prompt).decode())
    return found if salt is None else msgspec.structs.replace(found, salt=salt)


def _token_prompt(prompt: Any) -> Prompt | None:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return Prompt(units=tuple(prompt), exact=True, num_tokens=len(prompt))
    return None


def _chars(text: str) -> Prompt:
    return Prompt(units=tuple(map(ord, text)), exact=False, num_tokens=max(1, math.ceil(len(text) / CHARS_PER_TOKEN)))


def _text_messages(messages: Any) -> list[dict[str, Any]] | None:
    """Messages with text content only (lists of text parts joined with newlines, as vLLM does for
    string-content templates); None when a message has a part the router cannot render."""
    if not isinstance(messages, list):
        return None
    out = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                return None
            message = {**message, "content": "\n".join(p["text"] for p in content)}
        elif content is not None and not isinstance(content, str):
            return None
        out.append(message)
    return out


def _chat_text(messages: Any) -> str:
    """A stand-in for the rendered chat prompt: roles and text contents, in order."""
    parts = []
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        parts.append(f"<{message.get('role')}>{content if isinstance(content, str) else ''}")
    return "".join(parts)


def _token_text(token: Any) -> str:
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _raise(message: str) -> None:
    raise ValueError(message)
