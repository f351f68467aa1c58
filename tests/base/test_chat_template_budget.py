"""Chat templates render in transformers' sandbox under a time and size budget; every problem is one
ChatTemplateError naming the template's source (the spec, or the checkpoint's chat_template.jinja)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import IMAGE, assistant, user

from resonance.base import chat_template
from resonance.base.chat_template import ChatTemplate
from resonance.base.registry import load_core_mapper
from resonance.errors import ChatTemplateError

ORIGIN = "specs/x.yaml: chat_template.template"
CONVERSATION = [user(IMAGE, "What colour?"), assistant("Red.")]
ECHO = "{% for m in messages %}{{ m['role'] }}: {{ m['content'][-1]['text'] }}\n{% endfor %}"


def _render(template: str) -> str:
    return ChatTemplate(template, ORIGIN).render(CONVERSATION, add_generation_prompt=True)


def test_a_plain_template_renders_as_transformers_does(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llava")
    processor = load_core_mapper(path).processor(path)
    ours = ChatTemplate(processor.chat_template, ORIGIN).render(
        CONVERSATION, add_generation_prompt=True, **processor.tokenizer.special_tokens_map
    )
    assert ours == processor.hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert "What colour?" in ours


def test_a_loop_without_end_is_stopped_by_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.2)
    nested = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=rf"^{ORIGIN}: the chat template took longer than 0.2 s"):
        _render(nested)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{ 'a' * 1000000000 }}", "builds a repeated string or list of 1,000,000,000 items"),
        ("{{ [0] * 1000000000 }}", "builds a repeated string or list of 1,000,000,000 items"),
        ("{{ 7 ** 10000000 }}", "computes 7 ** 10000000"),
        ("{{ 'x'|center(1000000000) }}", "calls the center filter with 1,000,000,000"),
        (  # doubling a string 60 times, with ~ and with +
            "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "builds a joined string of",
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "builds a joined string or list of",
        ),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
        ("{{ ''.__class__.__mro__ }}", "did something the sandbox forbids (access to attribute '__class__'"),
        ("{{ ''.__class__ }}", "did something the sandbox forbids"),
        ("{{ cycler.__init__.__globals__ }}", "did something the sandbox forbids"),
        ("{% for m in messages %}{{ m['role'] }", "has a syntax error at line 1"),
        ("{{ raise_exception('System role not supported') }}", "refused the conversation: System role not supported"),
        ("{{ 1 / 0 }}", "failed: ZeroDivisionError: division by zero"),
    ],
)
def test_each_problem_is_one_error_naming_the_source(template: str, problem: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        _render(template)
    message = str(info.value)
    assert message.startswith(f"{ORIGIN}: the chat template ")
    assert problem in message
    assert "\n" not in message


def test_an_escape_attempt_writes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    escape = (
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
        "{{ c()._module.__builtins__['open'](" + repr(str(marker)) + ", 'w').write('ran') }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        _render(escape)
    assert not marker.exists()


def test_output_size_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "MAX_CHARS", 1000)
    with pytest.raises(ChatTemplateError, match="builds an output of 1,001 items, over the budget of 1,000"):
        _render("{% for i in range(1001) %}x{% endfor %}")


def _checkpoint_with_template(tiny_checkpoint, tmp_path: Path, template: str) -> Path:
    """A copy of llava's tiny checkpoint whose chat_template.jinja is ``template``."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llava"), folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{% for m in messages %}{{ m.role }", "has a syntax error at line 1"),
        ("{# renders nothing #}", "renders nothing for a user message"),
        ("   \n", "renders nothing for a user message"),
        ("USER: hello ASSISTANT:", "does not render the messages' text"),
        ("{{ ''.__class__.__mro__ }}", "did something the sandbox forbids"),
    ],
)
def test_a_broken_checkpoint_template_fails_when_the_processor_is_built(
    tiny_checkpoint, tmp_path: Path, template: str, problem: str
) -> None:
    folder = _checkpoint_with_template(tiny_checkpoint, tmp_path, template)
    with pytest.raises(ChatTemplateError) as info:
        load_core_mapper(folder).processor(folder)
    assert str(info.value).startswith(f"{folder / 'chat_template.jinja'}: the chat template ")
    assert problem in str(info.value)


def test_an_inline_template_is_named_by_its_spec(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_checkpoint("llava")
    processor_class = load_core_mapper(path).processor
    monkeypatch.setattr(processor_class, "inline_chat_template", ECHO.replace("}}\n", "}"))
    with pytest.raises(ChatTemplateError, match=r"^specs/llava.yaml: chat_template.template: .* syntax error"):
        processor_class(path)
    monkeypatch.setattr(processor_class, "inline_chat_template", ECHO)
    assert processor_class(path).render_conversation(CONVERSATION, add_generation_prompt=False) == (
        "user: What colour?\nassistant: Red.\n"
    )


def test_the_template_in_use_is_worked_out_once_and_follows_a_new_template(tiny_checkpoint) -> None:
    """Every row renders through it: its origin (a look at the checkpoint folder) is found once, not per render,
    and a template assigned later (an API user's ``processor.hf.chat_template = ...``) is the one rendered."""
    path = tiny_checkpoint("llava")
    mapper = load_core_mapper(path)
    processor = mapper.processor(path)
    first = processor.chat_template_source()
    assert processor.chat_template_source() is first and first.origin.startswith(str(path))
    processor.hf.chat_template = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
    assert processor.render_conversation([user("hi")], add_generation_prompt=False) == "[user]"
    assert processor.chat_template_source() is not first
