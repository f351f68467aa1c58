"""Chat templates rendered in Hugging Face's sandbox, under a time and size budget.

A chat template is code from a checkpoint or a spec. transformers renders it in jinja2's
``ImmutableSandboxedEnvironment`` with a few globals and filters of its own (``raise_exception``,
``strftime_now``, ``tojson``, a restricted ``dict`` and ``namespace``, the ``{% generation %}`` tag); the sandbox
stops escapes but not a template that loops for hours or builds a string of gigabytes. Here the same
environment (its globals, filters and extensions are taken from transformers' own, so the rendered text is
byte-identical) is subclassed with a budget: every loop, call, attribute lookup and output chunk checks a
wall-clock deadline; ``*``, ``**``, ``+``, ``~`` and size arguments of filters are refused when their result would
pass the size cap; an attribute the sandbox calls unsafe is an error at once instead of an empty string. Every
problem is a :class:`~resonance.errors.ChatTemplateError` naming where the template came from.

Verified with transformers 5.24 and jinja2 3.1.6 (``transformers.utils.chat_template_utils``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer
from transformers.utils import chat_template_utils as hf_chat

from resonance.errors import ChatTemplateError

RENDER_SECONDS = 10.0  # one conversation; real templates take milliseconds
MAX_CHARS = 16_000_000  # characters of output, or items of any string or list a template builds
MAX_INT_BITS = 1 << 16  # integers a template computes with `*` or `**`


class _OverBudget(Exception):
    """Raised inside a rendering that passed its time or size budget."""


@dataclass
class _Budget:
    deadline: float
    seconds: float
    max_chars: int

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"took longer than {self.seconds:g} s to render one conversation (a loop without end?)")


_CURRENT: ContextVar[_Budget | None] = ContextVar("resonance_chat_template_budget", default=None)


def _tick() -> None:
    budget = _CURRENT.get()
    if budget is not None:
        budget.tick()


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, str | bytes | list | tuple) else None


def _check_size(size: int, what: str) -> None:
    if size > MAX_CHARS:
        raise _OverBudget(f"builds {what} of {size:,} items, over the budget of {MAX_CHARS:,}")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``left <operator> right`` before computing it, when its result would pass the budget."""
    ints = all(isinstance(v, int) for v in (left, right))
    if operator == "**" and ints and right > 0 and abs(left) > 1:
        if right * abs(left).bit_length() > MAX_INT_BITS:
            raise _OverBudget(f"computes {left} ** {right}, over the budget of {MAX_INT_BITS} bits")
    elif operator == "*" and ints:
        if abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
            raise _OverBudget(f"multiplies integers over the budget of {MAX_INT_BITS} bits")
    elif operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if _size(sequence) is not None and isinstance(times, int):
                _check_size(_size(sequence) * max(times, 0), "a repeated string or list")
    elif operator == "+" and _size(left) is not None and _size(right) is not None:
        _check_size(_size(left) + _size(right), "a joined string or list")


def _budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with its size arguments (ints after the filtered value, like ``center(width)``) and result capped."""
    skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1  # context/environment, then the value

    @functools.wraps(func)  # keeps jinja_pass_arg
    def budgeted(*args: Any, **kwargs: Any) -> Any:
        for value in (*args[skip:], *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
                raise _OverBudget(f"calls the {name} filter with {value:,}, over the budget of {MAX_CHARS:,}")
        result = func(*args, **kwargs)
        if _size(result) is not None:
            _check_size(_size(result), f"with the {name} filter a value")
        return result

    return budgeted


class _Iteration:
    """An iterable that checks the deadline at every item; it keeps ``len`` for ``loop.length``."""

    def __init__(self, iterable: Iterable[Any]):
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            _tick()
            yield item

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]  # a TypeError tells jinja to count the items


class _Budgeting(NodeTransformer):
    """Route every ``{% for %}`` iterable and every ``~`` concatenation through the environment's budget."""

    @staticmethod
    def _call(method: str, argument: nodes.Expr, lineno: int) -> nodes.Call:
        return nodes.Call(nodes.EnvironmentAttribute(method), [argument], [], None, None, lineno=lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = self._call("budget_iter", node.iter, node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return self._call("budget_concat", nodes.List(node.nodes, lineno=node.lineno), node.lineno)


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template sandbox, with a deadline and size caps (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self) -> None:
        hf = hf_chat._compile_jinja_template("").environment  # transformers' own environment, for its additions
        super().__init__(
            trim_blocks=hf.trim_blocks,
            lstrip_blocks=hf.lstrip_blocks,
            extensions=[type(extension) for extension in hf.extensions.values()],
        )
        self.globals.update(hf.globals)
        self.filters.update({name: _budgeted_filter(name, func) for name, func in hf.filters.items()})

    def compile_budgeted(self, source: str) -> jinja2.Template:
        tree = _Budgeting().visit(self.parse(source))
        tree.set_environment(self)
        return self.from_string(tree)

    def budget_iter(self, iterable: Iterable[Any]) -> _Iteration:
        return _Iteration(iterable)

    def budget_concat(self, parts: list[Any]) -> str:
        texts = [str(part) for part in parts]
        _check_size(sum(map(len, texts)), "a joined string")
        return "".join(texts)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@functools.cache
def _environment() -> BudgetedSandbox:
    return BudgetedSandbox()


@functools.lru_cache(maxsize=32)
def _compiled(source: str) -> jinja2.Template:
    return _environment().compile_budgeted(source)


def _problem(exc: BaseException) -> str:
    """What went wrong, in words, for a rendering or compilation that raised ``exc``."""
    if isinstance(exc, TemplateSyntaxError):
        return f"has a syntax error at line {exc.lineno}: {exc.message}"
    if isinstance(exc, _OverBudget):
        return str(exc)
    if isinstance(exc, SecurityError):
        return f"did something the sandbox forbids ({exc}); chat templates may only format the conversation"
    if isinstance(exc, RecursionError):
        return "recursed too deeply (a macro or recursive loop that calls itself without end?)"
    if isinstance(exc, MemoryError):
        return "ran out of memory"
    if isinstance(exc, UndefinedError):
        return f"failed: {exc}"
    if isinstance(exc, TemplateError):  # raise_exception(...) in the template
        return f"refused the conversation: {exc}"
    return f"failed: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and where it came from (``origin``: a spec file and field, or a checkpoint file)."""

    source: str
    origin: str

    def compile(self) -> jinja2.Template:
        """The compiled template; a syntax error is a :class:`ChatTemplateError`."""
        try:
            return _compiled(self.source)
        except (TemplateError, RecursionError, MemoryError) as exc:
            raise ChatTemplateError(f"{self.origin}: the chat template {_problem(exc)}") from exc

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, **variables: Any) -> str:
        """What transformers' ``apply_chat_template(messages, tokenize=False, ...)`` returns for this template,
        with ``variables`` (the tokenizer's special tokens) in scope, within the time and size budget."""
        template = self.compile()
        chat = hf_chat._alias_reasoning_fields(hf_chat._plain_template_data(hf_chat._normalize_chat_messages(messages)))
        context = {
            **hf_chat._plain_template_data(variables),
            "messages": chat,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        budget = _Budget(time.monotonic() + RENDER_SECONDS, RENDER_SECONDS, MAX_CHARS)
        token = _CURRENT.set(budget)
        chunks: list[str] = []
        size = 0
        try:
            for chunk in template.generate(**context):
                size += len(chunk)
                _check_size(size, "an output")
                budget.tick()
                chunks.append(chunk)
        except Exception as exc:  # noqa: BLE001 - whatever the template does wrong, it is the template's
            roles = ", ".join(str(m.get("role")) for m in chat)
            raise ChatTemplateError(
                f"{self.origin}: the chat template {_problem(exc)} (rendering a conversation of roles: {roles})"
            ) from exc
        finally:
            _CURRENT.reset(token)
        return "".join(chunks)
