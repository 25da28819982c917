"""Item text from the processed item table: one text per item, rendered from a template.

Template language
-----------------
A template is ordinary text with ``{field}`` placeholders (``{{`` / ``}}`` for literal braces).
It is cut into *segments*: a segment is the literal text before a placeholder, the placeholder,
and the closing punctuation (``. , ; : ! ? ) ] " '``) plus whitespace right after it. A segment
whose field is null, NaN, empty after cleaning, or not a column at all is dropped whole, so

    "Title: {title}. Brand: {brand}. Price: {price}. {description}"

gives "Title: Lipstick. Price: $12.00." when brand and description are missing, never
"Brand: .". "{title} by {brand}." drops " by ..." with the brand. Text after the last segment is
kept only when some segment was kept. An item with no segment kept has the empty text "".
A value already ending in ". ! ?" swallows a "." that opens its suffix (no "1oz.. ").

Values are cleaned: HTML entities unescaped (``&amp;`` -> ``&``), tags stripped, whitespace
collapsed. ``price`` is written ``$1,234.50``; integral floats (a year read as float) lose ".0".
A placeholder may carry a format spec (``{year:04d}``), applied instead of the default.
"""

from __future__ import annotations

import html
import math
import re
import string
from dataclasses import dataclass
from typing import Any

import polars as pl

DEFAULT_TEMPLATE = (
    "Title: {title}. Brand: {brand}. Categories: {categories}. Genres: {genres}. "
    "Year: {year}. Price: {price}. {description}"
)

# Fields a template may name even when the table lacks the column (datasets differ in which
# text they have); any other name must be a column, so a typo fails instead of dropping silently.
KNOWN_FIELDS = frozenset(
    {"item_id", "raw_id", "title", "brand", "categories", "price", "description", "year", "genres"}
)

_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # a letter after "<" so "a < b" is not a tag
_SPACE = re.compile(r"\s+")
_CLOSERS = set(".,;:!?)]\"'")


@dataclass(frozen=True)
class _Segment:
    prefix: str
    field: str
    spec: str
    suffix: str


def _parse_template(template: str) -> tuple[list[_Segment], str]:
    """Split a template into segments and the trailing literal text."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}") from None
    segments: list[_Segment] = []
    pending = ""  # literal text that becomes the prefix of the next placeholder
    for literal, field, spec, conversion in parts:
        if segments and segments[-1].suffix == "" and pending == "":
            # Closing punctuation + whitespace after the previous placeholder belongs to it.
            i = 0
            while i < len(literal) and literal[i] in _CLOSERS:
                i += 1
            while i < len(literal) and literal[i].isspace():
                i += 1
            prev = segments[-1]
            segments[-1] = _Segment(prev.prefix, prev.field, prev.spec, literal[:i])
            literal = literal[i:]
        pending += literal
        if field is None:
            continue
        if field == "" or not field.isidentifier():
            raise ValueError(
                f"template {template!r}: placeholder {{{field}}} must name a column, "
                "e.g. {title}"
            )
        if conversion:
            raise ValueError(f"template {template!r}: conversions like !{conversion} unsupported")
        segments.append(_Segment(pending, field, spec or "", ""))
        pending = ""
    if not segments:
        raise ValueError(f"template {template!r} has no {{field}} placeholder")
    return segments, pending


def clean_text(value: str) -> str:
    """Unescape HTML entities, strip tags, collapse whitespace."""
    # Unescape twice: scraped descriptions often hold double-escaped entities ("&amp;amp;").
    text = html.unescape(html.unescape(value))
    text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def _format_value(field: str, value: Any, spec: str) -> str:
    """The cleaned text of one value, "" when missing."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if spec:
        text = format(value, spec)
    elif field == "price" and isinstance(value, (int, float)):
        text = f"${value:,.2f}"
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value if v is not None)
    else:
        text = str(value)
    return clean_text(text)


def _render_rows(items: pl.DataFrame, template: str) -> list[str]:
    segments, tail = _parse_template(template)
    fields = list(dict.fromkeys(s.field for s in segments))
    for f in fields:
        if f not in items.columns and f not in KNOWN_FIELDS:
            raise ValueError(
                f"template field {{{f}}} is not a column of the item table "
                f"(columns: {items.columns})"
            )
    present = [f for f in fields if f in items.columns]
    n = items.height
    columns = {f: items.get_column(f).to_list() for f in present}
    texts: list[str] = []
    for i in range(n):
        out: list[str] = []
        for seg in segments:
            col = columns.get(seg.field)
            if col is None:
                continue
            try:
                value = _format_value(seg.field, col[i], seg.spec)
            except (ValueError, TypeError) as e:
                raise ValueError(f"item table row {i}, field {seg.field!r}: {e}") from None
            if value:
                suffix = seg.suffix
                if suffix[:1] == "." and value[-1] in ".!?":
                    suffix = suffix[1:]  # "1oz." + ". " -> "1oz. ", not "1oz.. "
                out.append(f"{seg.prefix}{value}{suffix}")
        texts.append(_SPACE.sub(" ", "".join(out) + tail).strip() if out else "")
    return texts


def item_texts(items: pl.DataFrame, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One text per row of ``items`` (row i = item_id i); "" for an item with no field present."""
    return _render_rows(items, template)


def items_with_text(items: pl.DataFrame, template: str = DEFAULT_TEMPLATE) -> int:
    """How many items have a non-empty text under ``template``."""
    return sum(1 for t in _render_rows(items, template) if t)
