"""The dataset formats people bring, each recognised from a row's top-level keys and converted to the native row
that :mod:`resonance.data.rows` validates (so every problem keeps its ``FILE:LINE: field: message`` quality).

======================== ============================ =============================================================
name                     kinds                        documented shape (and who writes it)
======================== ============================ =============================================================
sharegpt_preference      preference, prompt           ``conversations`` (from/value) ending with a human turn +
                                                      ``chosen`` / ``rejected`` ``{"from": "gpt", "value": str}``
                                                      objects, optional ``system`` (LLaMA-Factory sharegpt DPO)
sharegpt                 sft, prompt                  ``conversations`` of ``{"from", "value"}`` turns, optional
                                                      ``system`` (LLaVA, LLaMA-Factory, ShareGPT4V)
swift_preference         preference, prompt           ``messages`` ending with the chosen answer +
                                                      ``rejected_response`` (str) or ``rejected_messages`` (a whole
                                                      conversation) (ms-swift DPO / RM)
messages                 sft, prompt                  ``messages`` of ``{"role", "content", "loss"?}`` (OpenAI,
                                                      TRL, LLaMA-Factory, ms-swift)
trl_preference           preference, prompt           ``prompt`` / ``chosen`` / ``rejected`` (TRL explicit prompt)
trl_prompt_completion    sft, prompt                  ``prompt`` + ``completion``; only the completion is trained
                                                      (TRL prompt-completion, ``completion_only_loss``)
trl_prompt               prompt                       ``prompt`` alone (TRL prompt-only: GRPO, PPO, generate)
swift_sharegpt           sft, prompt                  ``conversation`` rounds ``{"human": str, "assistant": str}``,
                                                      optional ``system`` (ms-swift sharegpt)
swift_query              sft, preference, prompt      ``query`` / ``response`` (+ ``rejected_response``), optional
                                                      ``history`` ``[[query, response], ...]`` and ``system``
                                                      (ms-swift query-response)
alpaca                   sft, preference, prompt      ``instruction`` / ``input`` / ``output`` (or ``chosen`` /
                                                      ``rejected``), optional ``history`` and ``system``
                                                      (alpaca, LLaMA-Factory, ms-swift)
trl_implicit_preference  preference, prompt           ``chosen`` / ``rejected`` whole conversations that share their
                                                      prompt turns (TRL implicit prompt)
======================== ============================ =============================================================

Detection (:func:`detect_format`) takes the first format in :data:`FORMATS` that claims a row's keys and feeds the
kind asked for. Where formats share keys the order decides, on purpose:

- ``messages`` + ``rejected_response`` is ``swift_preference`` for DPO / RM and GRPO / PPO prompts; for SFT it is a
  plain ``messages`` row (the chosen conversation is trained, as ms-swift does with its DPO files) and
  ``rejected_response`` stays in the row, where the loader reports it as an unused field.
- ``conversations`` + ``chosen`` / ``rejected`` is ``sharegpt_preference``; ``sharegpt`` does not claim it, so an SFT
  run on such a file is told it holds preference rows rather than that its conversation has no answer.
- ``prompt`` + ``chosen`` / ``rejected`` is ``trl_preference``; ``chosen`` / ``rejected`` without ``prompt`` is
  ``trl_implicit_preference`` (last, after ``alpaca``, whose preference rows have ``chosen`` / ``rejected`` too).
- ``prompt`` + ``completion`` + ``label`` is TRL's unpaired preference (KTO), which no format takes: training its
  completions as SFT answers would learn the ones labelled bad.

Every preference format feeds prompt files (``resonance generate``, GRPO, PPO) too: it is converted as for DPO and
the loader ignores the answers. A key set to ``None`` counts as absent (a column another row of the file has).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from resonance.errors import ConfigError

Row = dict[str, Any]
Converter = Callable[[Row, str, list[str]], Row | None]

# What a user runs with rows of each kind, for hints.
KIND_COMMANDS: dict[str, str] = {
    "sft": "`resonance train sft`",
    "preference": "`resonance train dpo` or `rm`",
    "prompt": "`resonance generate` or `resonance train grpo` / `ppo`",
}
_SYSTEM_TWICE = "system: the conversation starts with a 'system' turn too; keep one of the two"
# LLaMA-Factory's and VL-RLHF's sharegpt roles -> chat roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class DataFormat:
    """One dataset format: how a row of it is recognised and turned into the native row the loader validates.

    ``required``: groups of alternative keys; a row of the format has one key of every group. ``excluded``: keys
    that make a row another format's (detection only). ``convert``: the conversion, ``None`` for the native shapes
    (then :meth:`to_native` is the identity).
    """

    name: str
    summary: str
    kinds: frozenset[str]
    required: tuple[tuple[str, ...], ...]
    excluded: tuple[str, ...] = ()
    convert: Converter | None = field(default=None, repr=False, compare=False)

    def claims(self, keys: Collection[str]) -> bool:
        """Whether a row with these top-level keys is of this format."""
        return not self.missing(keys) and not any(key in keys for key in self.excluded)

    def to_native(self, row: Row, kind: str, problems: list[str]) -> Row | None:
        """The native row for ``kind``: the converted fields plus every key of ``row`` the conversion did not
        consume, untouched. ``None``, with messages naming the row's own fields appended to ``problems``, when the
        row does not have this format's shape."""
        if kind not in self.kinds:
            problems.append(f"{self.name} rows are for {_commands(self.kinds)}, not {kind} rows")
            return None
        missing = self.missing(_present(row))
        if missing:
            problems.append(f"missing field {' and '.join(missing)} ({self.name} rows are {self.summary})")
            return None
        return row if self.convert is None else self.convert(row, kind, problems)

    @property
    def keys(self) -> frozenset[str]:
        """Every top-level key the format names as required."""
        return frozenset(key for group in self.required for key in group)

    def missing(self, keys: Collection[str]) -> list[str]:
        """The required keys a row with ``keys`` lacks, one ``'a' or 'b'`` text per group of alternatives."""
        return [" or ".join(repr(key) for key in group) for group in self.required if not any(k in keys for k in group)]


# ----------------------------------------------------------------------------------------- conversions


def _sharegpt(row: Row, kind: str, problems: list[str]) -> Row | None:
    """LLaMA-Factory's optional ``system`` column becomes the conversation's leading system turn."""
    if row.get("system") is None:
        return row
    system = _text(row, "system", problems)
    conversations = row["conversations"]
    if system is None or not isinstance(conversations, list):  # a wrong conversation: the loader names it
        return None if system is None else row
    if conversations and isinstance(conversations[0], dict) and conversations[0].get("from") == "system":
        problems.append(_SYSTEM_TWICE)
        return None
    turns = [{"from": "system", "value": system}, *conversations]
    return _replace(row, ("system", "conversations"), {"conversations": turns}, problems)


def _sharegpt_preference(row: Row, kind: str, problems: list[str]) -> Row | None:
    before = len(problems)
    prompt = _sharegpt_turns(row["conversations"], "conversations", problems)
    system = _system(row, problems)
    answers = {name: _sharegpt_answer(row[name], name, problems) for name in ("chosen", "rejected")}
    if prompt is not None and prompt[-1]["role"] != "user":
        last = _article(row["conversations"][-1]["from"])
        problems.append(f"conversations: must end with the human turn that chosen and rejected answer, got {last} turn")
    if prompt is not None and system and prompt[0]["role"] == "system":
        problems.append(_SYSTEM_TWICE)
    if len(problems) > before or prompt is None or system is None:
        return None
    native = {"prompt": system + prompt, "chosen": answers["chosen"], "rejected": answers["rejected"]}
    return _replace(row, ("conversations", "system", "chosen", "rejected"), native, problems)


def _swift_sharegpt(row: Row, kind: str, problems: list[str]) -> Row | None:
    """ms-swift's sharegpt: ``conversation`` rounds ``{"human": query, "assistant": response}`` and ``system``."""
    rounds = row["conversation"]
    system = _system(row, problems)
    if not isinstance(rounds, list) or not rounds:
        got = "an empty list" if rounds == [] else json_type(rounds)
        problems.append(f'conversation: must be a list of {{"human": str, "assistant": str}} rounds, got {got}')
        return None
    messages: list[Row] = []
    for i, turn in enumerate(rounds):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(key), str) for key in ("human", "assistant")):
            sharegpt = isinstance(turn, dict) and "from" in turn
            hint = '; {"from", "value"} turns go in "conversations" (sharegpt)' if sharegpt else ""
            problems.append(f'conversation[{i}]: must be an object {{"human": str, "assistant": str}}{hint}')
            return None
        messages += _round(turn["human"], turn["assistant"])
    if system is None:
        return None
    return _replace(row, ("conversation", "system"), {"messages": system + messages}, problems)


def _swift_preference(row: Row, kind: str, problems: list[str]) -> Row | None:
    if row.get("rejected_response") is not None and row.get("rejected_messages") is not None:
        problems.append("has both 'rejected_response' and 'rejected_messages'; keep one (the rejected answer)")
        return None
    consumed = ("messages", "rejected_response", "rejected_messages")
    if row.get("rejected_messages") is not None:
        names = ("messages", "rejected_messages")
        split = _split_shared_prompt(row["messages"], row["rejected_messages"], names, problems)
        if split is None:
            return None
        prompt, chosen, rejected = split
        return _replace(row, consumed, {"prompt": prompt, "chosen": chosen, "rejected": rejected}, problems)
    messages = row["messages"]
    roles = _roles(messages, "messages", problems)
    rejected_text = _text(row, "rejected_response", problems)
    if roles is None or rejected_text is None:
        return None
    if roles[-1] != "assistant":
        last = _article(roles[-1])
        problems.append(f"messages: must end with the chosen answer (an 'assistant' turn), got {last} turn")
        return None
    if "user" not in roles:
        problems.append("messages: no 'user' turn before the chosen answer (the prompt ends with the turn it answers)")
        return None
    if rejected_text == messages[-1].get("content"):
        problems.append("rejected_response: the same as the chosen answer (messages[-1]); a pair needs two answers")
        return None
    rejected = [{"role": "assistant", "content": rejected_text}]
    return _replace(row, consumed, {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": rejected}, problems)


def _trl_prompt_completion(row: Row, kind: str, problems: list[str]) -> Row | None:
    """SFT: prompt then completion as one conversation; the prompt's assistant turns get ``"loss": False``."""
    if kind == "prompt":
        return row  # the native prompt row; the completion is not used
    prompt = _conversation(row["prompt"], "prompt", "user", problems)
    completion = _conversation(row["completion"], "completion", "assistant", problems)
    if prompt is None or completion is None:
        return None
    for i, message in enumerate(completion):
        if message["role"] != "assistant":
            problems.append(
                f"completion[{i}].role: must be 'assistant' (the completion is the answer), got {message['role']!r}"
            )
            return None
    unsupervised = [{**m, "loss": False} if m["role"] == "assistant" else m for m in prompt]
    return _replace(row, ("prompt", "completion"), {"messages": unsupervised + completion}, problems)


def _trl_implicit_preference(row: Row, kind: str, problems: list[str]) -> Row | None:
    split = _split_shared_prompt(row["chosen"], row["rejected"], ("chosen", "rejected"), problems)
    if split is None:
        return None
    prompt, chosen, rejected = split
    return _replace(row, ("chosen", "rejected"), {"prompt": prompt, "chosen": chosen, "rejected": rejected}, problems)


def _swift_query(row: Row, kind: str, problems: list[str]) -> Row | None:
    query = _text(row, "query", problems)
    return _query_answers(row, kind, problems, query, ("query",), answers=("response", "response", "rejected_response"))


def _alpaca(row: Row, kind: str, problems: list[str]) -> Row | None:
    """The user turn is ``instruction`` and ``input`` joined by a newline (LLaMA-Factory's and ms-swift's rule)."""
    instruction = _text(row, "instruction", problems)
    given = _text(row, "input", problems) if row.get("input") is not None else ""
    query = None if instruction is None or given is None else "\n".join(t for t in (instruction, given) if t)
    answers = ("output", "chosen", "rejected")
    return _query_answers(row, kind, problems, query, ("instruction", "input"), answers=answers)


def _query_answers(
    row: Row,
    kind: str,
    problems: list[str],
    query: str | None,
    query_fields: tuple[str, ...],
    answers: tuple[str, str, str],
) -> Row | None:
    """The shared part of the query-style formats: ``system`` + ``history`` pairs + the query as the prompt, then
    ``answers`` = (SFT answer, chosen, rejected) field names."""
    before = len(problems)
    history = _history(row, problems)
    system = _system(row, problems)
    if query is None or history is None or system is None or len(problems) > before:
        return None
    prompt = [*system, *history, {"role": "user", "content": query}]
    consumed = ("system", "history", *query_fields)
    if kind == "prompt":
        return _replace(row, consumed, {"prompt": prompt}, problems)
    answer, chosen, rejected = answers
    if kind == "sft":
        for_dpo = f"; {chosen!r} / {rejected!r} are for DPO" if chosen != answer else ""
        response = _text(row, answer, problems, hint=f"the answer to train on{for_dpo}")
        if response is None:
            return None
        messages = [*prompt, {"role": "assistant", "content": response}]
        return _replace(row, (*consumed, answer), {"messages": messages}, problems)
    hint = "a preference row has a chosen and a rejected answer"
    pair = [_text(row, name, problems, hint=hint) for name in (chosen, rejected)]
    if None in pair:
        return None
    native = {"prompt": prompt, "chosen": pair[0], "rejected": pair[1]}
    return _replace(row, (*consumed, chosen, rejected), native, problems)


# ------------------------------------------------------------------------------------------ the table

FORMATS: tuple[DataFormat, ...] = (
    DataFormat(
        "sharegpt_preference",
        '{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ... ending with "human"], "chosen":'
        ' {"from": "gpt", "value": str}, "rejected": {"from": "gpt", "value": str}, "system"?: str}'
        " (LLaMA-Factory sharegpt preference)",
        frozenset({"preference", "prompt"}),
        (("conversations",), ("chosen",), ("rejected",)),
        convert=_sharegpt_preference,
    ),
    DataFormat(
        "sharegpt",
        '{"conversations": [{"from": "human" | "gpt" | "system", "value": str}], "system"?: str}'
        " (LLaVA, LLaMA-Factory sharegpt)",
        frozenset({"sft", "prompt"}),
        (("conversations",),),
        excluded=("chosen", "rejected"),
        convert=_sharegpt,
    ),
    DataFormat(
        "swift_preference",
        '{"messages": [..., the chosen "assistant" answer], "rejected_response": str} or {"messages": [...],'
        ' "rejected_messages": [the same turns, another answer]} (ms-swift DPO / RM)',
        frozenset({"preference", "prompt"}),
        (("messages",), ("rejected_response", "rejected_messages")),
        convert=_swift_preference,
    ),
    DataFormat(
        "messages",
        '{"messages": [{"role": "system" | "user" | "assistant", "content": str | [parts], "loss"?: bool}]}'
        " (OpenAI, TRL, LLaMA-Factory, ms-swift)",
        frozenset({"sft", "prompt"}),
        (("messages",),),
    ),
    DataFormat(
        "trl_preference",
        '{"prompt": str | [messages ending with a user turn], "chosen": str | [assistant messages], "rejected": str'
        " | [assistant messages]} (TRL preference, explicit prompt)",
        frozenset({"preference", "prompt"}),
        (("prompt",), ("chosen",), ("rejected",)),
    ),
    DataFormat(
        "trl_prompt_completion",
        '{"prompt": str | [messages], "completion": str | [assistant messages]}; only the completion is trained'
        " (TRL prompt-completion)",
        frozenset({"sft", "prompt"}),
        (("prompt",), ("completion",)),
        excluded=("label",),  # TRL's unpaired preference (KTO): a completion labelled bad must not be trained
        convert=_trl_prompt_completion,
    ),
    DataFormat(
        "trl_prompt",
        '{"prompt": str | [messages ending with a user turn]} (TRL prompt-only)',
        frozenset({"prompt"}),
        (("prompt",),),
        excluded=("chosen", "rejected", "completion"),  # a preference or KTO row missing a field: told which
    ),
    DataFormat(
        "swift_sharegpt",
        '{"conversation": [{"human": str, "assistant": str}, ...], "system"?: str} (ms-swift sharegpt)',
        frozenset({"sft", "prompt"}),
        (("conversation",),),
        convert=_swift_sharegpt,
    ),
    DataFormat(
        "swift_query",
        '{"query": str, "response": str, "rejected_response"?: str (DPO / RM), "history"?: [[query, response],'
        ' ...], "system"?: str} (ms-swift query-response)',
        frozenset({"sft", "preference", "prompt"}),
        (("query",),),
        convert=_swift_query,
    ),
    DataFormat(
        "alpaca",
        '{"instruction": str, "input"?: str, "output": str (SFT) | "chosen": str, "rejected": str (DPO / RM),'
        ' "history"?: [[query, response], ...], "system"?: str} (alpaca, LLaMA-Factory, ms-swift)',
        frozenset({"sft", "preference", "prompt"}),
        (("instruction",),),
        convert=_alpaca,
    ),
    DataFormat(
        "trl_implicit_preference",
        '{"chosen": [messages], "rejected": [messages]}: two whole conversations that share their prompt turns and'
        " end in different answers (TRL preference, implicit prompt)",
        frozenset({"preference", "prompt"}),
        (("chosen",), ("rejected",)),
        convert=_trl_implicit_preference,
    ),
)
_BY_NAME = {data_format.name: data_format for data_format in FORMATS}


def format_named(name: str) -> DataFormat:
    """The format called ``name`` (``--data_format NAME``); :class:`ConfigError` with a did-you-mean otherwise."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = ", ".join(_BY_NAME)
    raise ConfigError(f"--data_format: unknown format {name!r}; {hint}the formats are {known}, or 'auto' (per row)")


def detect_format(keys: Collection[str], kind: str) -> DataFormat | None:
    """The first format of :data:`FORMATS` that claims a row with these top-level keys and feeds ``kind``, or
    ``None`` (then :func:`format_hint` says why)."""
    return next((f for f in FORMATS if kind in f.kinds and f.claims(keys)), None)


def format_hint(keys: Collection[str], kind: str) -> str:
    """Why no format takes a row with these keys for ``kind``, for the error message (which already lists the
    row's fields): the format the row has, when that one is for other commands; else misspelled keys and the
    closest formats of ``kind`` with what keeps the row from them."""
    names = ", ".join(f.name for f in FORMATS if kind in f.kinds)
    other = next((f for f in FORMATS if f.claims(keys)), None)
    if other is not None:
        uses = other.kinds - {"prompt"} or other.kinds  # preference rows make prompts too, but are for DPO / RM
        return f"this looks like a {other.name} row, for {_commands(uses)}; {kind} rows are written as {names}"
    known = sorted({key for f in FORMATS for key in f.keys})
    typos = [
        f"{key!r}: did you mean {close[0]!r}? "
        for key in keys
        if key not in known and (close := difflib.get_close_matches(key, known, n=1, cutoff=0.8))
    ]
    scored = [(len(f.keys & set(keys)), f) for f in FORMATS if kind in f.kinds]
    best = max(score for score, _ in scored)
    if best == 0:
        return f"{''.join(typos)}no {kind} format has any of these fields; the {kind} formats are {names}"
    closest = [f for score, f in scored if score == best][:2]
    shapes = "; ".join(f"{f.name} ({_misfit(f, keys)}): {f.summary}" for f in closest)
    return f"{''.join(typos)}the closest {kind} format: {shapes}"


# -------------------------------------------------------------------------------------------- helpers


def _misfit(data_format: DataFormat, keys: Collection[str]) -> str:
    """What keeps a row with ``keys`` from ``data_format``: the keys it misses, or those of another format."""
    missing = data_format.missing(keys)
    if missing:
        return f"missing {' and '.join(missing)}"
    return f"but with {' and '.join(repr(key) for key in data_format.excluded if key in keys)}, not in this format"


def _present(row: Row) -> set[str]:
    """The row's keys that hold a value (``datasets`` gives a row ``None`` for another row's column)."""
    return {key for key, value in row.items() if value is not None}


def _replace(row: Row, consumed: tuple[str, ...], native: Row, problems: list[str]) -> Row | None:
    """``native`` plus every key of ``row`` not in ``consumed``; a problem if ``row`` has a key ``native`` makes."""
    rest = {key: value for key, value in row.items() if key not in consumed}
    clash = [key for key in native if key in rest and rest[key] is not None]
    if clash:
        used = ", ".join(repr(key) for key in consumed if row.get(key) is not None)
        problems.append(f"has both {used} and {', '.join(repr(k) for k in clash)}; a row is written in one format")
        return None
    return {**native, **rest}


def _text(row: Row, name: str, problems: list[str], hint: str = "") -> str | None:
    """The string ``row[name]``, or ``None`` with a problem when it is absent or not a string."""
    value = row.get(name)
    if value is None:
        problems.append(f"missing field {name!r}" + (f" ({hint})" if hint else ""))
    elif not isinstance(value, str):
        problems.append(f"{name}: must be a string, got {json_type(value)}")
    else:
        return value
    return None


def _system(row: Row, problems: list[str]) -> list[Row] | None:
    """The optional ``system`` column as a leading system message (``[]`` when absent), ``None`` when not text."""
    if row.get("system") is None:
        return []
    text = _text(row, "system", problems)
    return None if text is None else [{"role": "system", "content": text}]


def _round(query: str, response: str) -> list[Row]:
    return [{"role": "user", "content": query}, {"role": "assistant", "content": response}]


def _history(row: Row, problems: list[str]) -> list[Row] | None:
    """``history`` ``[[query, response], ...]`` as user and assistant messages (none when absent)."""
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        problems.append(f"history: must be a list of [query, response] pairs, got {json_type(history)}")
        return None
    messages: list[Row] = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            problems.append(f"history[{i}]: must be a [query, response] pair of strings, got {pair!r}")
            return None
        messages += _round(*pair)
    return messages


def _roles(value: Any, name: str, problems: list[str]) -> list[str] | None:
    """The roles of a non-empty list of messages (objects with a string ``role``), or ``None`` with a problem."""
    if not isinstance(value, list):
        problems.append(f"{name}: must be a list of messages, got {json_type(value)}")
        return None
    if not value:
        problems.append(f"{name}: empty conversation; it needs at least one message")
        return None
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            problems.append(f"{name}[{i}]: a message must be an object with 'role' and 'content'")
            return None
    return [message["role"] for message in value]


def _conversation(value: Any, name: str, role: str, problems: list[str]) -> list[Row] | None:
    """A string (one message of ``role``) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return None if _roles(value, name, problems) is None else value


def _sharegpt_turns(value: Any, name: str, problems: list[str]) -> list[Row] | None:
    """sharegpt ``{"from", "value"}`` turns as chat messages."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else json_type(value)
        problems.append(f'{name}: must be a list of {{"from": ..., "value": str}} turns, got {got}')
        return None
    messages = []
    for i, turn in enumerate(value):
        message = _sharegpt_message(turn, f"{name}[{i}]", problems)
        if message is None:
            return None
        messages.append(message)
    return messages


def _sharegpt_answer(value: Any, name: str, problems: list[str]) -> list[Row] | None:
    """A sharegpt preference answer: one ``{"from": "gpt", "value": str}`` object."""
    message = _sharegpt_message(value, name, problems)
    if message is not None and message["role"] != "assistant":
        problems.append(f"{name}.from: must be 'gpt' (the answer), got {value['from']!r}")
        return None
    return None if message is None else [message]


def _sharegpt_message(turn: Any, where: str, problems: list[str]) -> Row | None:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        shape = '{"from": "human" | "gpt" | "system", "value": str}'
        problems.append(f"{where}: must be an object {shape}, got {turn!r}")
        return None
    if turn["from"] not in _SHAREGPT_ROLES:
        expected = ", ".join(repr(role) for role in _SHAREGPT_ROLES)
        problems.append(f"{where}.from: unknown value {turn['from']!r}; expected one of {expected}")
        return None
    if not isinstance(turn["value"], str):
        problems.append(f"{where}.value: must be a string, got {json_type(turn['value'])}")
        return None
    return {"role": _SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}


def _split_shared_prompt(
    chosen: Any, rejected: Any, names: tuple[str, str], problems: list[str]
) -> tuple[list[Row], list[Row], list[Row]] | None:
    """Two whole conversations -> (the turns they share, chosen's answer, rejected's answer), with TRL's
    ``extract_prompt``; the shared turns must end with a user turn and the rest be assistant turns."""
    texts = [name for value, name in zip((chosen, rejected), names, strict=True) if isinstance(value, str)]
    if texts:
        other = (
            "give the prompt in 'prompt'" if names[0] == "chosen" else "give the rejected text in 'rejected_response'"
        )
        problems.append(
            f"{' and '.join(texts)}: text; an implicit-prompt pair is two conversations (lists of messages) that share"
            f" their prompt turns; for text answers {other}"
        )
        return None
    before = len(problems)
    for value, name in zip((chosen, rejected), names, strict=True):
        _roles(value, name, problems)
    if len(problems) > before:
        return None
    shorter, longer = sorted((chosen, rejected), key=len)
    if longer[: len(shorter)] == shorter:
        what = "are the same conversation" if len(shorter) == len(longer) else "differ only by turns added at the end"
        problems.append(f"{names[0]} and {names[1]} {what}; they must end in two different answers")
        return None
    from trl.data_utils import extract_prompt  # lazily: trl imports torch

    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    prompt, answers = split["prompt"], (split["chosen"], split["rejected"])
    at = len(prompt)
    if not prompt:
        problems.append(
            f"{names[0]} and {names[1]} share no leading turns; their shared turns are the prompt (or give the prompt"
            " in 'prompt')"
        )
        return None
    if prompt[-1]["role"] != "user":
        problems.append(
            f"{names[0]}[{at}] and {names[1]}[{at}] differ after {_article(prompt[-1]['role'])} turn; the turns both"
            " share are the prompt, and must end with the user turn that both answer"
        )
        return None
    for name, answer in zip(names, answers, strict=True):
        for i, message in enumerate(answer):
            if message["role"] != "assistant":
                problems.append(
                    f"{name}[{at + i}]: {_article(message['role'])} turn after the two conversations diverge at"
                    f" {name}[{at}]; they may differ only in their final assistant answer"
                )
                return None
    return prompt, answers[0], answers[1]


def json_type(value: Any) -> str:
    """A JSON value's kind as error messages name it: "an object", "a list", "a string", "a number", ..."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeio' else 'a'} {word!r}"  # a 'user' turn, an 'assistant' turn


def _commands(kinds: Collection[str]) -> str:
    return "; ".join(KIND_COMMANDS[kind] for kind in ("sft", "preference", "prompt") if kind in kinds)
