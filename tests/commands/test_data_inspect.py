"""``resonance data inspect``: the printed report of an SFT, a preference and a prompt file (format, counts, token
lengths per family, unused fields, problems), its exit codes, and the ``--html`` page read back as a browser would
parse it: thumbnails as data URIs, exactly the answers inside the supervised highlight, image tokens as one
marker, hostile text escaped. Tiny LLaVA, Qwen2-VL and PaliGemma (which needs an image in every row)."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import datasets
from helpers import make_image, save_png, write_jsonl
from PIL import Image
from typer.testing import CliRunner

from resonance.base.registry import load_core_mapper
from resonance.cli import app
from resonance.errors import EXIT_FAILED, EXIT_INPUT, EXIT_OK

HOSTILE = "<script>alert('x')</script>"


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    """sharegpt turns: (from, value) pairs."""
    return [{"from": who, "value": value} for who, value in pairs]


def _images(folder: Path) -> None:
    save_png(folder, "cat.png", make_image(40, 30, seed=1))
    save_png(folder, "box.png", make_image(64, 48, seed=2))


def _sft_file(folder: Path, *extra: dict[str, Any]) -> Path:
    """LLaMA-Factory sharegpt rows (``conversations`` of from/value, ``images``): text-only, one image, two images
    (cat.png twice in the file), each with a field no loader reads (``meta``)."""
    _images(folder)
    rows = [
        {"conversations": _turns(("human", "Is the sky blue?"), ("gpt", "Yes, it is.")), "meta": 1},
        {
            "images": ["cat.png"],
            "conversations": _turns(("human", "<image>What animal is this?"), ("gpt", "A small cat.")),
            "meta": 2,
        },
        {
            "images": ["cat.png", "box.png"],
            "conversations": _turns(("human", "<image><image>Which picture is larger?"), ("gpt", "The second one.")),
            "meta": 3,
        },
    ]
    return write_jsonl(folder / "sft.jsonl", [*rows, *extra])


def _preference_file(folder: Path) -> Path:
    """TRL explicit-prompt preference rows (``prompt``, ``chosen``, ``rejected`` as message lists, ``images``)."""
    _images(folder)
    image_question = [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]
    rows = [
        {
            "images": ["cat.png"],
            "prompt": [{"role": "user", "content": image_question}],
            "chosen": [{"role": "assistant", "content": "A small cat."}],
            "rejected": [{"role": "assistant", "content": "A large dog."}],
        },
        {
            "prompt": [{"role": "user", "content": "Is the sky blue?"}],
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": "No, it is green."}],
        },
    ]
    return write_jsonl(folder / "dpo.jsonl", rows)


@dataclass(frozen=True)
class Run:
    exit_code: int
    output: str  # stdout, each line without the table's trailing padding
    stderr: str


def _inspect(*args: str | Path) -> Run:
    result = CliRunner().invoke(app, ["data", "inspect", *map(str, args)], env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    output = "\n".join(line.rstrip() for line in result.stdout.splitlines()) + "\n"
    return Run(result.exit_code, output, result.stderr)


def _length_row(output: str, checkpoint: Path) -> list[str]:
    """The cells of the token-length table's row for ``checkpoint``."""
    line = next(line for line in output.splitlines() if str(checkpoint) in line and "│" in line)
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


def _collated_lengths(checkpoint: Path, rows: list[list[dict[str, Any]]], images: list[list[str]]) -> list[int]:
    """Each conversation's tokens as the family's processor builds them for training (the exact measure)."""
    processor = load_core_mapper(checkpoint).processor(checkpoint)
    lengths = []
    for conversation, paths in zip(rows, images, strict=True):
        opened = [Image.open(path).convert("RGB") for path in paths]
        lengths.append(int(processor.process_batch_conv([conversation], [opened])["attention_mask"].sum()))
    return lengths


# -- the printed report ------------------------------------------------------------------------------------------


def test_sft_report(tmp_path: Path, tiny_checkpoint: Any) -> None:
    llava = tiny_checkpoint("llava")
    invalid = {
        "images": ["missing.png"],
        "conversations": _turns(("human", "<image>Hi?"), ("gpt", "Hello.")),
        "meta": 4,
    }
    data = _sft_file(tmp_path, invalid)
    result = _inspect(data, "--model", llava)

    assert result.exit_code == EXIT_FAILED, result.output  # one invalid row: the report prints, exit 1
    out = result.output
    assert re.search(r"format\s+sharegpt\n", out) and re.search(r"kind\s+sft\n", out)
    assert re.search(r"rows\s+3 valid, 1 invalid\n", out)
    assert re.search(r"rows with 0 / 1 / 2\+ images\s+1 / 1 / 1\n", out)
    assert re.search(rf"images\s+3 \(2 distinct files\); largest 64 x 48: {re.escape(str(tmp_path / 'box.png'))}", out)
    assert re.search(r"unused fields\s+meta \(4 rows\)", out)
    assert re.search(rf"problems:\n  {re.escape(str(data))}:4: .*missing\.png", out)

    cells = _length_row(out, llava)
    assert cells[1:3] == ["llava", "3"] and cells[-1] == "0"
    p50, p90, p99, longest = map(int, cells[3:7])
    text_only, one_image, two_images = _collated_lengths(
        llava,
        [
            [_chat("user", "Is the sky blue?"), _chat("assistant", "Yes, it is.")],
            [_chat("user", None, "What animal is this?"), _chat("assistant", "A small cat.")],
            [_chat("user", None, None, "Which picture is larger?"), _chat("assistant", "The second one.")],
        ],
        [[], [str(tmp_path / "cat.png")], [str(tmp_path / "cat.png"), str(tmp_path / "box.png")]],
    )
    assert text_only < one_image < two_images  # so the percentiles pick distinct rows
    # The lengths are row_lengths' estimates: exact up to template white space around an image (LENGTH_SLACK 2).
    assert abs(p50 - one_image) <= 2 and abs(longest - two_images) <= 2 and p90 == p99 == longest


def _chat(role: str, *parts: str | None) -> dict[str, Any]:
    """A canonical message; None is an image part."""
    content = [{"type": "image", "text": None} if p is None else {"type": "text", "text": p} for p in parts]
    return {"role": role, "content": content}


def test_preference_report_auto_kind(tmp_path: Path, tiny_checkpoint: Any) -> None:
    qwen = tiny_checkpoint("qwen2_vl")
    result = _inspect(_preference_file(tmp_path), "--model", qwen)

    assert result.exit_code == EXIT_OK, result.output
    out = result.output
    assert re.search(r"format\s+trl_preference\n", out) and re.search(r"kind\s+preference\n", out)
    assert re.search(r"rows\s+2 valid, 0 invalid\n", out)
    assert re.search(r"rows with 0 / 1 / 2\+ images\s+1 / 1 / 0\n", out)
    assert re.search(r"unused fields\s+none\n", out) and "problems: none" in out
    cells = _length_row(out, qwen)
    assert cells[1:3] == ["qwen2_vl", "2"]
    # A pair's length is its longer answer's conversation.
    longest = max(
        _collated_lengths(
            qwen,
            [
                [_chat("user", None, "What animal is this?"), _chat("assistant", "A large dog.")],
                [_chat("user", None, "What animal is this?"), _chat("assistant", "A small cat.")],
            ],
            [[str(tmp_path / "cat.png")]] * 2,
        )
    )
    assert abs(int(cells[6]) - longest) <= 2


def test_prompt_lengths_are_the_generation_prompts(tmp_path: Path, tiny_checkpoint: Any) -> None:
    llava = tiny_checkpoint("llava")
    _images(tmp_path)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"images": ["box.png"], "prompt": "<image>Describe it."}])
    result = _inspect(data, "--kind", "prompt", "--model", llava)

    assert result.exit_code == EXIT_OK, result.output
    assert re.search(r"kind\s+prompt\n", result.output)
    processor = load_core_mapper(llava).processor(llava)
    text = processor.render_conversation([_chat("user", None, "Describe it.")], add_generation_prompt=True)
    image = Image.open(tmp_path / "box.png").convert("RGB")
    exact = processor(text=[text], images=[[image]])["input_ids"].shape[1]
    assert abs(int(_length_row(result.output, llava)[6]) - exact) <= 2


def test_rows_a_family_cannot_take(tmp_path: Path, tiny_checkpoint: Any) -> None:
    # PaliGemma needs an image in every row (spec image.required) and learns only a last assistant turn (its
    # processor takes the answer as a suffix): the text-only row and a row ending with a question are refused.
    paligemma = tiny_checkpoint("paligemma")
    unanswered = {
        "images": ["box.png"],
        "conversations": _turns(("human", "<image>Hi?"), ("gpt", "Hi."), ("human", "And?")),
    }
    data = _sft_file(tmp_path, unanswered)
    result = _inspect(data, "--model", paligemma, "--max_problems", "5")

    assert result.exit_code == EXIT_FAILED, result.output
    assert re.search(r"rows\s+4 valid, 0 invalid\n", result.output)
    cells = _length_row(result.output, paligemma)
    assert cells[1:3] == ["paligemma", "2"] and cells[-1] == "2"
    named = re.escape(str(paligemma))
    assert re.search(rf"  {re.escape(str(data))}:1: {named}: 0 image\(s\), but", result.output)
    assert re.search(rf"  {re.escape(str(data))}:4: {named}: .*must end with the assistant turn", result.output)


def test_data_flags_reach_the_loader(tmp_path: Path) -> None:
    """A parquet file built with datasets (rows named FILE:row N), its images under --image_root, and the kind
    guessed from its columns."""
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    _images(pictures)
    rows = {
        "images": [["cat.png"], []],
        "prompt": ["<image>What animal is this?", "Is the sky blue?"],
        "chosen": ["A small cat.", "Yes."],
        "rejected": ["A large dog.", "No."],
    }
    data = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(data))

    result = _inspect(data, "--image_root", pictures)
    assert result.exit_code == EXIT_OK, result.output + result.stderr
    assert result.stderr == ""  # no progress bar of datasets' split generation: the report is the output
    assert re.search(r"kind\s+preference\n", result.output) and re.search(r"format\s+trl_preference\n", result.output)
    assert re.search(
        rf"images\s+1 \(1 distinct files\); largest 40 x 30: {re.escape(str(pictures / 'cat.png'))}", result.output
    )

    result = _inspect(data)  # without --image_root the image is looked for next to the file
    assert result.exit_code == EXIT_FAILED
    assert re.search(rf"  {re.escape(str(data))}:row 0: .*cat\.png", result.output)
    result = _inspect(data, "--image_root", pictures, "--data_format", "sharegpt")
    assert result.exit_code == EXIT_INPUT and "--data_format sharegpt" in result.stderr


def test_without_a_model_neither_torch_nor_transformers_loads(tmp_path: Path) -> None:
    """The report of a file alone is quick: the command imports no model library."""
    data = _sft_file(tmp_path)
    code = (
        "import sys; from resonance.cli import main; code = main(['data', 'inspect', sys.argv[1]]); "
        "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "0 []", result.stdout + result.stderr


# -- exit codes --------------------------------------------------------------------------------------------------


def test_unreadable_file_is_exit_2(tmp_path: Path) -> None:
    result = _inspect(tmp_path / "nothere.jsonl")
    assert result.exit_code == EXIT_INPUT and "nothere.jsonl" in result.stderr and "not found" in result.stderr
    mixed = [
        {"conversations": _turns(("human", "Hi?"), ("gpt", "Hello."))},
        {"prompt": "Hi?", "completion": "Hello."},  # TRL prompt-completion: another tool's format
    ]
    result = _inspect(write_jsonl(tmp_path / "mixed.jsonl", mixed))  # a file-level problem, though rows are named
    assert result.exit_code == EXIT_INPUT and "rows in 2 formats" in result.stderr and result.output == "\n"
    result = _inspect(_sft_file(tmp_path), "--kind", "dpo")
    assert result.exit_code == EXIT_INPUT and "--kind must be one of auto, sft, preference, prompt" in result.stderr


def test_every_row_invalid_still_reports(tmp_path: Path) -> None:
    rows = [{"conversations": _turns(("robot", "Hi"), ("gpt", "Hello."))}, {"conversations": []}]
    result = _inspect(write_jsonl(tmp_path / "bad.jsonl", rows), "--max_problems", "1")

    assert result.exit_code == EXIT_FAILED, result.output
    assert re.search(r"rows\s+0 valid, 2 invalid\n", result.output)
    assert re.search(r"problems \(first 1 of \d+\):\n  .*bad\.jsonl:1: .*'robot'", result.output)
    assert "bad.jsonl:2" not in result.output


def test_existing_page_is_kept_without_overwrite(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text("mine", encoding="utf-8")
    result = _inspect(_sft_file(tmp_path), "--html", page)
    assert result.exit_code == EXIT_FAILED and "pass --overwrite" in result.stderr
    assert page.read_text(encoding="utf-8") == "mine"
    result = _inspect(_sft_file(tmp_path), "--html", page, "--overwrite")
    assert result.exit_code == EXIT_OK, result.output
    assert page.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    result = _inspect(_sft_file(tmp_path), "--html", tmp_path / "nowhere" / "report.html")
    assert result.exit_code == EXIT_INPUT and "--html" in result.stderr and "no such folder" in result.stderr


# -- the page ----------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """One tokenized conversation of the page: the family heading and title it is under, the text of its
    supervised tokens, of its other tokens, and its image markers."""

    family: str
    title: str
    supervised: str = ""
    prompt: str = ""
    markers: list[str] = field(default_factory=list)


class PageReader(HTMLParser):
    """The page's rows as a browser parses them: per row its source, thumbnails and conversations."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.stack: list[str] = []  # the class of each open element
        self.text_of: str | None = None  # the class whose text is being collected outside the tokens
        self.family = self.title = ""
        self.conversation: Conversation | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or tag
        self.stack.append(cls)
        if cls == "row":
            self.rows.append({"source": "", "images": [], "conversations": []})
        elif tag == "img" and self.rows:
            self.rows[-1]["images"].append(dict(attrs)["src"])
            self.stack.pop()  # void element
        elif cls == "tokens":
            self.conversation = Conversation(self.family, self.title)
            self.rows[-1]["conversations"].append(self.conversation)
        elif cls in ("source", "h3") or (tag == "div" and self.rows and "tokens" not in self.stack):
            self.text_of = cls

    def handle_endtag(self, tag: str) -> None:
        cls = self.stack.pop()
        if cls == "tokens":
            self.conversation = None
        self.text_of = None if cls == self.text_of else self.text_of

    def handle_data(self, data: str) -> None:
        if self.conversation is not None:
            if "img" in self.stack:
                self.conversation.markers.append(data)
            elif "sup" in self.stack:
                self.conversation.supervised += data
            else:
                self.conversation.prompt += data
        elif self.text_of == "source" and self.rows and not self.rows[-1]["source"]:
            self.rows[-1]["source"] = data
        elif self.text_of == "h3":
            self.family = data
        elif self.text_of == "div":
            self.title = data


def _read_page(path: Path) -> tuple[str, list[dict[str, Any]]]:
    page = path.read_text(encoding="utf-8")
    reader = PageReader()
    reader.feed(page)
    return page, reader.rows


def _image_tokens(checkpoint: Path, conversation: list[dict[str, Any]], paths: list[Path]) -> int:
    processor = load_core_mapper(checkpoint).processor(checkpoint)
    images = [Image.open(path).convert("RGB") for path in paths]
    ids = processor.process_batch_conv([conversation], [images])["input_ids"]
    return int((ids == processor.image_token_id).sum())


def test_page_shows_labels_images_and_escapes(tmp_path: Path, tiny_checkpoint: Any) -> None:
    llava, qwen = tiny_checkpoint("llava"), tiny_checkpoint("qwen2_vl")
    hostile = {"images": ["box.png"], "conversations": _turns(("human", f"<image>Read {HOSTILE}"), ("gpt", HOSTILE))}
    broken = {"conversations": _turns(("human", "Hi"), (HOSTILE, "Hello."))}  # its problem quotes the bad role
    data = _sft_file(tmp_path, hostile, broken)
    page_path = tmp_path / "report.html"
    result = _inspect(data, "--model", llava, "--model", qwen, "--html", page_path)

    assert result.exit_code == EXIT_FAILED, result.output  # the broken row
    page, rows = _read_page(page_path)
    assert "<script" not in page.lower() and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "http" not in page and "<link" not in page  # nothing to fetch
    assert [row["source"] for row in rows] == [f"{data}:{line}" for line in (1, 2, 3, 4)]
    assert [len(row["images"]) for row in rows] == [0, 1, 2, 1]
    for uri in rows[2]["images"]:
        assert uri.startswith("data:image/png;base64,")
        thumbnail = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert thumbnail.format == "PNG" and max(thumbnail.size) <= 160

    families = {f"{llava} (llava)", f"{qwen} (qwen2_vl)"}
    for row, answer, question in [
        (rows[0], "Yes, it is.", "Is the sky blue?"),
        (rows[1], "A small cat.", "What animal is this?"),
        (rows[2], "The second one.", "Which picture is larger?"),
        (rows[3], HOSTILE, "Read "),
    ]:
        assert {c.family for c in row["conversations"]} == families
        for conversation in row["conversations"]:
            assert conversation.title == "conversation"
            assert conversation.supervised.strip().startswith(answer)  # the answer (and its end-of-turn token)
            assert question not in conversation.supervised and question in conversation.prompt
            assert len(conversation.markers) == len(row["images"])

    # The marker counts the family's image tokens for that image.
    cat = [_chat("user", None, "What animal is this?"), _chat("assistant", "A small cat.")]
    for checkpoint, family in ((llava, "llava"), (qwen, "qwen2_vl")):
        (conversation,) = [c for c in rows[1]["conversations"] if c.family == f"{checkpoint} ({family})"]
        expected = _image_tokens(checkpoint, cat, [tmp_path / "cat.png"])
        assert expected > 1 and conversation.markers == [f"[image x {expected} tokens]"]


def test_page_of_preference_rows(tmp_path: Path, tiny_checkpoint: Any) -> None:
    paligemma = tiny_checkpoint("paligemma")  # the processor labels the answer (a suffix) itself
    page_path = tmp_path / "dpo.html"
    result = _inspect(_preference_file(tmp_path), "--model", paligemma, "--html", page_path, "--sample", "1")

    assert result.exit_code == EXIT_FAILED, result.output  # the text-only pair: PaliGemma needs an image
    _, rows = _read_page(page_path)
    (row,) = rows  # --sample 1: the first row
    chosen, rejected = row["conversations"]
    assert (chosen.title, rejected.title) == ("chosen", "rejected")
    assert chosen.supervised.strip().startswith("A small cat.") and "dog" not in chosen.supervised
    assert rejected.supervised.strip().startswith("A large dog.") and "cat" not in rejected.supervised
    for conversation in (chosen, rejected):
        assert "What animal is this?" in conversation.prompt and len(conversation.markers) == 1


def test_page_says_what_a_family_cannot_take(tmp_path: Path, tiny_checkpoint: Any) -> None:
    paligemma = tiny_checkpoint("paligemma")
    page_path = tmp_path / "report.html"
    _inspect(_sft_file(tmp_path), "--model", paligemma, "--html", page_path, "--sample", "1")
    page, rows = _read_page(page_path)
    assert rows[0]["conversations"] == []  # the text-only row: an error instead of tokens
    assert re.search(r'class="error">this family cannot take the row: [^<]*0 image\(s\), but', page)


def test_page_shows_an_unsupervised_turn_unhighlighted(tmp_path: Path, tiny_checkpoint: Any) -> None:
    """ms-swift's per-message ``"loss": false``: that answer is prompt on the page, the next one supervised."""
    qwen = tiny_checkpoint("qwen2_vl")
    _images(tmp_path)
    messages = [
        {"role": "user", "content": "<image>What animal is this?"},
        {"role": "assistant", "content": "A large dog.", "loss": False},
        {"role": "user", "content": "Look again."},
        {"role": "assistant", "content": "A small cat."},
    ]
    data = write_jsonl(tmp_path / "swift.jsonl", [{"images": ["cat.png"], "messages": messages}])
    page_path = tmp_path / "swift.html"
    assert _inspect(data, "--model", qwen, "--html", page_path).exit_code == EXIT_OK

    _, (row,) = _read_page(page_path)
    (conversation,) = row["conversations"]
    assert conversation.supervised.startswith("A small cat.") and "dog" not in conversation.supervised
    assert "A large dog." in conversation.prompt


def test_data_formats_lists_every_format() -> None:
    from resonance.data.formats import FORMATS

    result = CliRunner().invoke(app, ["data", "formats"], env={"COLUMNS": "400"})
    assert result.exit_code == EXIT_OK, result.output
    lines = result.stdout.splitlines()
    for data_format in FORMATS:
        (line,) = [line for line in lines if line.startswith(f"│ {data_format.name} ")]
        assert ", ".join(sorted(data_format.kinds)) in line and data_format.summary[:60] in line


def test_report_prints_the_data_verbatim(tmp_path: Path) -> None:
    """Field names and paths are printed as they are, never read as rich markup."""
    folder = tmp_path / "[bold]data"
    folder.mkdir()
    row = {"conversations": _turns(("human", "Hi?"), ("gpt", "Hello.")), "[red]note[/red]": 1}
    data = write_jsonl(folder / "sft.jsonl", [row])
    result = _inspect(data)
    assert result.exit_code == EXIT_OK, result.output
    assert f"file                         {data}\n" in result.output
    assert re.search(r"unused fields\s+\[red\]note\[/red\] \(1 rows\)\n", result.output)
