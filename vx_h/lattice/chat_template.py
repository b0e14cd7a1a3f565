"""Chat templates: find a model's Jinja chat template and render it like transformers' apply_chat_template.

A template comes from the model's files, so it is untrusted code: it runs in jinja2's immutable sandbox,
and any reach for Python internals (underscore attributes, unsafe methods) fails at once with a
ChatTemplateError naming where the template came from, instead of rendering as an empty string.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError


class _TemplateRaised(TemplateError):
    """raise_exception() called by the template itself (e.g. "roles must alternate")."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    # The stock sandbox turns an unsafe attribute into an Undefined that prints as "" and only fails on
    # further use; fail on the first touch so an escape attempt is reported, not silently rendered.
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, so templates cannot plant dunder attributes."""

    def __init__(*args, **kwargs):  # noqa: N805 (same signature trick as jinja2's Namespace)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_public(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_public(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_public(name):
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"namespace attribute {name!r} is not allowed (underscore prefix)")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson HTML-escapes <, >, & and '; chat templates expect plain JSON (as transformers gives).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment():
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


class ChatTemplate:
    """A compiled chat template and where it came from (`source`, used in every error message)."""

    def __init__(self, text: str, source: str):
        if not isinstance(text, str) or not text.strip():
            raise ChatTemplateError(f"{source}: chat template is empty or not a string")
        self.text = text
        self.source = source
        try:
            self._template = _environment().from_string(text)
        except TemplateSyntaxError as e:
            raise ChatTemplateError(f"{source}: chat template syntax error at line {e.lineno}: {e.message}") from e

    def render(self, messages, add_generation_prompt=True, *, bos_token="", eos_token="", tools=None,
               **template_vars) -> str:
        """Render `messages` (list of {"role", "content", ...} dicts). Extra keyword arguments (e.g.
        enable_thinking) are passed to the template as variables, as transformers does."""
        _check_messages(messages, self.source)
        context = dict(template_vars, messages=messages, add_generation_prompt=add_generation_prompt,
                       bos_token=bos_token, eos_token=eos_token, tools=tools)
        context.setdefault("documents", None)
        try:
            return self._template.render(**context)
        except SecurityError as e:
            raise ChatTemplateError(f"{self.source}: chat template tried to escape the sandbox: {e}") from e
        except _TemplateRaised as e:
            raise ChatTemplateError(f"{self.source}: chat template refused the messages: {e}") from e
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                ZeroDivisionError, OverflowError, RecursionError) as e:
            raise ChatTemplateError(f"{self.source}: chat template failed to render: "
                                    f"{type(e).__name__}: {e}") from e


def _check_messages(messages, source):
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"{source}: messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"{source}: messages[{i}] must be a dict with a 'role', got {message!r:.80}")


def _pick_named(templates, source):
    """tokenizer_config.json may hold a list of {"name", "template"}; the chat template is "default"."""
    named = {}
    for entry in templates:
        if not isinstance(entry, dict) or "name" not in entry or "template" not in entry:
            raise ChatTemplateError(f"{source}: chat_template list entries must be {{name, template}} dicts")
        named[entry["name"]] = entry["template"]
    if "default" not in named:
        raise ChatTemplateError(f"{source}: chat_template list has no 'default' entry (has {sorted(named)})")
    return named["default"]


def load_folder_chat_template(folder) -> ChatTemplate | None:
    """chat_template.jinja wins over tokenizer_config.json's chat_template (newer transformers saves the
    template in its own file and leaves the config without one). None if the folder has neither."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return ChatTemplate(f.read(), jinja_path)
    config_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"{config_path}: cannot read tokenizer config: {e}") from e
    template = config.get("chat_template") if isinstance(config, dict) else None
    if template is None:
        return None
    source = f"{config_path} (chat_template)"
    if isinstance(template, list):
        template = _pick_named(template, source)
    return ChatTemplate(template, source)


def load_gguf_chat_template(metadata: dict, source: str = "GGUF") -> ChatTemplate | None:
    """`tokenizer.chat_template` from GGUF metadata; None if absent."""
    template = metadata.get("tokenizer.chat_template")
    if template is None:
        return None
    return ChatTemplate(template, f"{source} (tokenizer.chat_template)")
