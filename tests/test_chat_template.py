"""Chat templates: rendered like transformers' apply_chat_template, found in every place a model keeps
one, and sandboxed. Expected renderings: tests/oracles/tokenizer_fixtures.py (transformers 5.24)."""
import datetime
import json
import os

import pytest

from lattice.chat_template import ChatTemplate, load_folder_chat_template
from lattice.errors import ChatTemplateError
from lattice.formats import read_gguf_metadata
from lattice.tokenizer import Tokenizer

from conftest import FIXTURES

TOK_FIXTURES = os.path.join(FIXTURES, "tokenizer")
with open(os.path.join(TOK_FIXTURES, "chat_templates.json"), encoding="utf-8") as f:
    CASES = json.load(f)
USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_renders_like_transformers(case):
    template = ChatTemplate(case["template"], case["name"])
    rendered = template.render(case["messages"], case["add_generation_prompt"], bos_token=case["bos_token"],
                               eos_token=case["eos_token"], tools=case["tools"])
    assert rendered == case["expected"]


def test_smollm2_gguf_chat_template(smollm2_path):
    tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(smollm2_path), str(smollm2_path))
    assert tok.has_chat_template
    case = next(c for c in CASES if c["name"] == "smollm2 system+user")
    assert tok.apply_chat_template(case["messages"]) == case["expected"]
    assert tok.apply_chat_template(case["messages"], add_generation_prompt=False) == \
        case["expected"].removesuffix("<|im_start|>assistant\n")
    ids = tok.encode(tok.apply_chat_template(case["messages"]), add_bos=False)
    assert ids[0] == 1 and ids.count(2) == 2   # <|im_start|> and <|im_end|> are single tokens


def test_tokenizer_config_named_templates_use_default():
    tok = Tokenizer.from_folder(os.path.join(TOK_FIXTURES, "tiny-bpe"))
    with open(os.path.join(TOK_FIXTURES, "tiny-bpe_expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    assert tok.apply_chat_template(expected["messages"]) == expected["chat"]   # bos_token is "<s>"


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config:{{ messages[0].content }}"}))
    assert load_folder_chat_template(tmp_path).render(USER) == "config:Hi"
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages[0].content }}")
    template = load_folder_chat_template(tmp_path)
    assert template.render(USER) == "jinja:Hi"
    assert template.source == str(tmp_path / "chat_template.jinja")


def test_no_chat_template(tmp_path):
    assert load_folder_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_folder_chat_template(tmp_path) is None
    tok = Tokenizer.from_folder(os.path.join(TOK_FIXTURES, "tiny-bpe"))
    tok.chat_template = None
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="tiny-bpe: the model has no chat template"):
        tok.apply_chat_template(USER)


def test_named_templates_without_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json \(chat_template\).*no 'default'.*tool_use"):
        load_folder_chat_template(tmp_path)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ messages['__class__'] }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace(__dict__=1) %}",
    "{% set ns = namespace() %}{% set ns._private = 1 %}",
])
def test_sandbox_escape_is_a_clear_error(template):
    with pytest.raises(ChatTemplateError, match="evil.jinja: chat template tried to escape the sandbox"):
        ChatTemplate(template, "evil.jinja").render(USER)


def test_syntax_error_names_source_and_line():
    with pytest.raises(ChatTemplateError, match=r"broken.jinja: chat template syntax error at line 2"):
        ChatTemplate("ok\n{% if %}", "broken.jinja")
    with pytest.raises(ChatTemplateError, match="empty.jinja: chat template is empty"):
        ChatTemplate("  ", "empty.jinja")


def test_template_errors_are_chat_template_errors():
    case = next(c for c in CASES if c["name"] == "features")
    template = ChatTemplate(case["template"], "features.jinja")
    with pytest.raises(ChatTemplateError, match="features.jinja: chat template refused the messages: unknown role robot"):
        template.render([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="t.jinja: chat template failed to render"):
        ChatTemplate("{{ 1 / 0 }}", "t.jinja").render(USER)
    with pytest.raises(ChatTemplateError, match=r"t.jinja: messages\[1\] must be a dict with a 'role'"):
        ChatTemplate("x", "t.jinja").render([USER[0], "hello"])
    with pytest.raises(ChatTemplateError, match="must be a list"):
        ChatTemplate("x", "t.jinja").render("hello")


def test_strftime_now_and_extra_template_variables():
    template = ChatTemplate("{{ strftime_now('%Y') }}{% if enable_thinking %} think{% endif %}", "t")
    year = str(datetime.datetime.now().year)
    assert template.render(USER) in (year, str(int(year) + 1))
    assert template.render(USER, enable_thinking=True).endswith(" think")
