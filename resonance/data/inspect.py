"""What ``resonance data inspect`` computes about a data file, and the HTML page it writes.

Reading (:func:`read_for_inspection`: the loader's rows, invalid rows and unused fields, never an error for
invalid rows), the counts a user checks before a long job (:func:`image_stats`, :func:`length_stats`), and the
page (:func:`render_page`) that shows sampled rows as the model family tokenizes them: supervised tokens
highlighted, image tokens collapsed into one marker (:func:`token_segments`), the images as thumbnails
(:func:`thumbnail_uri`). Model families reach this module only as values (token ids, labels, a decode function):
the data layer imports no model code; ``resonance.commands.data`` runs the families.
"""

from __future__ import annotations

import base64
import io
import os
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import jinja2
import numpy as np
from PIL import Image

from resonance.data.formats import detect_format
from resonance.data.images import image_size
from resonance.data.rows import KINDS, Kind, LoadedRows, read_rows
from resonance.data.sources import DatasetChoice, open_rows
from resonance.errors import ConfigError, ResonanceError

KIND_CHOICES: tuple[str, ...] = ("auto", *KINDS)
THUMBNAIL_PIXELS = 160  # the longer side of a thumbnail on the page
PERCENTILES = (50, 90, 99)


# --------------------------------------------------------------------------------------------- reading


def guess_kind(keys: Collection[str]) -> Kind:
    """``--kind auto``: the first kind of preference, sft, prompt whose data formats claim a row with these
    top-level keys (:func:`detect_format`); sft when none does (the loader then says why)."""
    kinds: tuple[Kind, ...] = ("preference", "sft", "prompt")
    return next((kind for kind in kinds if detect_format(keys, kind) is not None), "sft")


def read_for_inspection(
    path: str | os.PathLike[str],
    kind: str = "auto",
    *,
    image_placeholder: str = "<image>",
    **loader_options: Any,
) -> LoadedRows:
    """Read ``path`` as the training commands do (``loader_options``: :func:`read_rows`' data options, e.g.
    ``data_format``, ``image_root``, ``data_split``), keeping the invalid rows' problems instead of failing on them.

    ``kind`` ``"auto"``: :func:`guess_kind` of the first row. A source that cannot be read at all (missing, an
    unsupported type, no rows, rows in several formats) raises the loader's :class:`DataError`; a source whose rows
    are all invalid does not.
    """
    if kind not in KIND_CHOICES:
        raise ConfigError(f"--kind must be one of {', '.join(KIND_CHOICES)}, got {kind!r}")
    chosen = guess_kind(_first_row_keys(path, loader_options)) if kind == "auto" else cast(Kind, kind)
    return read_rows(
        path, chosen, image_placeholder=image_placeholder, skip_invalid=True, allow_no_rows=True, **loader_options
    )


def _first_row_keys(path: str | os.PathLike[str], options: dict[str, Any]) -> list[str]:
    """The top-level keys that hold a value in the first readable row ([] when there is none: the loader then says
    why)."""
    choice = DatasetChoice(options.get("data_config"), options.get("data_split"), options.get("data_revision"))
    try:
        rows = open_rows(path, choice).rows
    except ResonanceError:  # read_rows names it
        return []
    first = next((row.value for row in rows if isinstance(row.value, dict)), {})
    return [key for key, value in first.items() if value is not None]


# ---------------------------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class ImageStats:
    """Images over all rows: rows with 0, 1 and 2+ images, image references, distinct files, and the largest
    image by pixels (path, width, height; None without images)."""

    rows_with: dict[str, int]
    total: int
    distinct: int
    largest: tuple[str, int, int] | None


def image_stats(rows: Sequence[dict[str, Any]]) -> ImageStats:
    """:class:`ImageStats` of canonical rows; sizes come from each distinct file's header (no pixel decoded)."""
    buckets = Counter("0" if not row["images"] else "1" if len(row["images"]) == 1 else "2+" for row in rows)
    paths = {path for row in rows for path in row["images"]}
    sizes = {path: image_size(path) for path in paths}
    largest = max(sorted(sizes), key=lambda p: sizes[p][0] * sizes[p][1], default=None)
    return ImageStats(
        rows_with={bucket: buckets.get(bucket, 0) for bucket in ("0", "1", "2+")},
        total=sum(len(row["images"]) for row in rows),
        distinct=len(paths),
        largest=None if largest is None else (largest, *sizes[largest]),
    )


@dataclass(frozen=True)
class LengthStats:
    """Token lengths of ``rows`` rows: the 50th, 90th and 99th percentiles (observed lengths) and the maximum."""

    rows: int
    p50: int
    p90: int
    p99: int
    max: int


def length_stats(lengths: Sequence[int]) -> LengthStats | None:
    """:class:`LengthStats` of ``lengths`` (None when empty); percentiles by nearest rank."""
    if not lengths:
        return None
    p50, p90, p99 = (int(v) for v in np.percentile(lengths, PERCENTILES, method="inverted_cdf"))
    return LengthStats(len(lengths), p50, p90, p99, int(max(lengths)))


@dataclass(frozen=True)
class FamilyReport:
    """One ``--model``: its label (the checkpoint as given), adapter name, the token lengths of the rows it can
    take, and the rows it cannot (``(source, message)``)."""

    label: str
    family: str
    lengths: LengthStats | None
    problems: list[tuple[str, str]]


def all_problems(data: LoadedRows, families: Sequence[FamilyReport]) -> list[tuple[str, str]]:
    """The loader's problems, then each family's, its messages prefixed with the family's ``--model`` label."""
    return [*data.problems, *((source, f"{f.label}: {message}") for f in families for source, message in f.problems)]


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` row indices spread evenly over ``total`` rows, the first row included (all rows when fewer)."""
    if count >= total:
        return list(range(total))
    return sorted({i * total // count for i in range(count)})


# ------------------------------------------------------------------------------------------------ tokens

SegmentKind = Literal["prompt", "supervised", "image"]


@dataclass(frozen=True)
class Segment:
    """A run of tokens of one kind: ``prompt`` (not supervised), ``supervised`` (labels != -100), or ``image``
    (the image placeholder token, repeated; ``tokens`` empty, ``count`` of them)."""

    kind: SegmentKind
    tokens: tuple[str, ...]
    count: int


def token_segments(
    input_ids: Sequence[int],
    supervised: Sequence[bool],
    image_token_id: int,
    decode: Callable[[list[int]], str],
) -> list[Segment]:
    """The tokens of one conversation as runs of one kind, each token decoded on its own (a token that ends inside
    a multi-byte character is decoded together with the next ones, up to 4)."""
    kinds: list[SegmentKind] = [
        "image" if token == image_token_id else "supervised" if flag else "prompt"
        for token, flag in zip(input_ids, supervised, strict=True)
    ]
    segments: list[Segment] = []
    start = 0
    while start < len(kinds):
        end = start
        while end < len(kinds) and kinds[end] == kinds[start]:
            end += 1
        run = list(input_ids[start:end])
        tokens = () if kinds[start] == "image" else tuple(_decode_each(run, decode))
        segments.append(Segment(kinds[start], tokens, len(run)))
        start = end
    return segments


def _decode_each(ids: list[int], decode: Callable[[list[int]], str]) -> list[str]:
    texts: list[str] = []
    i = 0
    while i < len(ids):
        width = 1
        text = decode(ids[i : i + 1])
        while text.endswith("\ufffd") and width < 4 and i + width < len(ids):
            width += 1
            text = decode(ids[i : i + width])
        texts.append(text)
        i += width
    return texts


# -------------------------------------------------------------------------------------------------- page


def thumbnail_uri(path: str, pixels: int = THUMBNAIL_PIXELS) -> str:
    """A PNG thumbnail of the image at ``path`` (longer side at most ``pixels``) as a ``data:`` URI."""
    with Image.open(path) as image:
        image.draft("RGB", (pixels, pixels))  # JPEG: decode at a reduced scale
        thumb = image.convert("RGB")
    thumb.thumbnail((pixels, pixels))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class ConversationView:
    """One tokenized conversation of a sampled row (``title``: conversation, chosen, rejected or prompt), or the
    ``error`` the family raised for it."""

    title: str
    segments: list[Segment] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class SampleView:
    """A sampled row: its source, its images (path, width, height, thumbnail URI) and, per ``--model`` label,
    its conversations as that family tokenizes them."""

    source: str
    images: list[tuple[str, int, int, str]]
    families: dict[str, list[ConversationView]]


_PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """{% macro tokens(seg) %}{% for t in seg.tokens %}<span class="t">{{ t }}</span>{% endfor %}{% endmacro -%}
<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>resonance data inspect: {{ data.path }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d2433; max-width: 1200px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin: 28px 0 8px; } h3 { font-size: 14px; margin: 12px 0 4px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #d0d5dd; padding: 3px 8px;
 text-align: left; vertical-align: top; } th { background: #f2f4f7; }
.row { border: 1px solid #d0d5dd; border-radius: 6px; padding: 10px 14px; margin: 14px 0; }
.source { font-family: ui-monospace, monospace; font-weight: 600; }
.thumbs figure { display: inline-block; margin: 4px 10px 4px 0; font-size: 11px; color: #667085; }
.thumbs img { display: block; border: 1px solid #d0d5dd; }
.tokens { font-family: ui-monospace, monospace; font-size: 12.5px; white-space: pre-wrap; word-break: break-all;
 background: #fcfcfd; border: 1px solid #eaecf0; padding: 6px; }
.t { border-right: 1px solid #d0d5dd; }
mark.sup { background: #c6f6d5; color: #03543f; } mark.sup .t { border-right-color: #84e1bc; }
.img { background: #dbe4ff; color: #2b3ea8; border: 1px dashed #5b6ee1; padding: 0 3px; font-weight: 600; }
.error { color: #b42318; } .legend span { margin-right: 14px; }
.problems td:first-child { font-family: ui-monospace, monospace; white-space: nowrap; }
</style></head><body>
<h1>resonance data inspect: <span class="source">{{ data.path }}</span></h1>
<table class="summary">
<tr><th>format</th><td>{{ data.format or "(none: no valid row)" }}</td></tr>
<tr><th>kind</th><td>{{ data.kind }}</td></tr>
<tr><th>rows</th><td>{{ data.rows | length }} valid, {{ data.skipped }} invalid</td></tr>
<tr><th>rows with 0 / 1 / 2+ images</th><td>{{ images.rows_with["0"] }} / {{ images.rows_with["1"] }} /
 {{ images.rows_with["2+"] }}</td></tr>
<tr><th>images</th><td>{{ images.total }} ({{ images.distinct }} distinct files){% if images.largest %};
 largest {{ images.largest[1] }} x {{ images.largest[2] }}: {{ images.largest[0] }}{% endif %}</td></tr>
<tr><th>unused fields</th><td>{% for name, count in data.unused.items() %}{{ name }} ({{ count }} rows)
{%- if not loop.last %}, {% endif %}{% else %}none{% endfor %}</td></tr>
</table>
{% if families %}<h2>Token lengths (image tokens included)</h2>
<table><tr><th>model</th><th>family</th><th>rows</th><th>p50</th><th>p90</th><th>p99</th><th>max</th>
<th>rows it cannot take</th></tr>
{% for f in families %}<tr><td>{{ f.label }}</td><td>{{ f.family }}</td>{% if f.lengths %}<td>{{ f.lengths.rows }}</td>
<td>{{ f.lengths.p50 }}</td><td>{{ f.lengths.p90 }}</td><td>{{ f.lengths.p99 }}</td><td>{{ f.lengths.max }}</td>
{% else %}<td colspan="5">no row it can take</td>{% endif %}<td>{{ f.problems | length }}</td></tr>
{% endfor %}</table>{% endif %}
<h2>Problems{% if problems | length > shown | length %} (first {{ shown | length }} of {{ problems | length }}){%
 endif %}</h2>
{% if shown %}<table class="problems">{% for source, message in shown %}<tr><td>{{ source }}</td><td>{{ message }}</td>
</tr>{% endfor %}</table>{% else %}<p>none</p>{% endif %}
<h2>Sampled rows ({{ samples | length }} of {{ data.rows | length }})</h2>
<p class="legend"><span class="t">prompt token</span> <mark class="sup"><span class="t">supervised token</span></mark>
 <span class="img">[image x N tokens]</span></p>
{% for s in samples %}<div class="row"><div class="source">{{ s.source }}</div>
{% if s.images %}<div class="thumbs">{% for path, width, height, uri in s.images %}<figure><img src="{{ uri }}"
 alt="{{ path }}"><figcaption>{{ path }} ({{ width }} x {{ height }})</figcaption></figure>{% endfor %}</div>{% endif %}
{% for label, conversations in s.families.items() %}<h3>{{ label }}</h3>
{% for c in conversations %}<div>{{ c.title }}</div>
{% if c.error %}<div class="error">{{ c.error }}</div>
{% else %}<div class="tokens">
{%- for seg in c.segments -%}
{%- if seg.kind == "image" -%}<span class="img">[image x {{ seg.count }} tokens]</span>
{%- elif seg.kind == "supervised" -%}<mark class="sup">{{ tokens(seg) }}</mark>
{%- else -%}{{ tokens(seg) }}{%- endif -%}
{%- endfor -%}</div>
{% endif %}{% endfor %}{% endfor %}</div>
{% endfor %}</body></html>
"""
)


def render_page(
    data: LoadedRows,
    images: ImageStats,
    families: Sequence[FamilyReport],
    samples: Sequence[SampleView],
    max_problems: int,
) -> str:
    """The self-contained HTML report (inline CSS, images as data URIs, no script): the summary table, the
    problems (the first ``max_problems``), and per sampled row its thumbnails and tokens per family. Every text
    from the data is escaped (jinja2 autoescape)."""
    problems = all_problems(data, families)
    return _PAGE.render(
        data=data, images=images, families=families, samples=samples, problems=problems, shown=problems[:max_problems]
    )
