"""One document model rendered twice: Markdown (``report.md``, figures linked) and a
self-contained HTML page (``report.html``, figures embedded as base64 PNG).

Every number shown comes from a data frame that is also written as a CSV table, formatted
by :func:`fmt` (at most 4 significant digits), so :func:`check_traceable` can find each
number of ``report.md`` in ``tables/*.csv``.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd


def fmt(v, digits: int = 4, zeros: bool = False) -> str:
    """A number as shown in the report: integers as they are, floats with ``digits``
    significant digits, NaN/None as 'n/a', booleans as yes/no. ``zeros``: a measured value keeps
    its trailing zeros (10.951 at 3 digits is '11.0', not '11', beside '21.1'; 0.90025 at 2 is '0.90')."""
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "n/a"
        if zeros:
            out = f"{v + 0.0:#.{digits}g}"  # (+ 0.0: -0.0 reads 0.00)
            return out if "e" in out else out.rstrip(".")
        if v == int(v) and abs(v) < 1e6 and digits >= len(str(int(abs(v)))):
            return str(int(v))
        return f"{v:.{digits}g}"
    return str(v)


def ci(m, lo, hi, digits: int = 4) -> str:
    """'m [lo, hi]' (or just m where the interval is undefined), each with its trailing zeros."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt(m, digits, zeros=True)
    return f"{fmt(m, digits, zeros=True)} [{fmt(lo, digits, zeros=True)}, {fmt(hi, digits, zeros=True)}]"


@dataclass
class Table:
    frame: pd.DataFrame  # display frame (strings or numbers), already selected and renamed
    csv: str  # the CSV (relative path) it comes from
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]):
        self.blocks.append(("ul", list(items)))

    def table(self, frame: pd.DataFrame, csv: str, caption: str = ""):
        self.blocks.append(("table", Table(frame, csv, caption)))

    def figure(self, path: Path, caption: str):
        self.blocks.append(("fig", Figure(Path(path), caption)))


def _cell(v) -> str:
    return v if isinstance(v, str) else fmt(v)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, out_dir: Path) -> str:
    lines = [f"# {doc.title}", ""]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            lines += ["#" * (b[1] + 1) + " " + b[2], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "ul":
            lines += [f"- {x}" for x in b[1]] + [""]
        elif kind == "table":
            t: Table = b[1]
            if t.caption:
                lines += [f"*{t.caption}* (table: `{t.csv}`)", ""]
            else:
                lines += [f"(table: `{t.csv}`)", ""]
            if t.frame.empty:
                lines += ["(no rows)", ""]
                continue
            cols = [str(c) for c in t.frame.columns]
            lines.append("| " + " | ".join(_md_escape(c) for c in cols) + " |")
            lines.append("|" + "|".join("---" for _ in cols) + "|")
            for row in t.frame.itertuples(index=False):
                lines.append("| " + " | ".join(_md_escape(_cell(v)) for v in row) + " |")
            lines.append("")
        elif kind == "fig":
            f: Figure = b[1]
            rel = f.path.relative_to(out_dir).as_posix()
            lines += [f"![{f.caption}]({rel})", "", f"*{f.caption}*", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee}
.cap{color:#555;font-size:13px;margin:.2em 0 1.2em}
code{background:#f5f5f5;padding:0 3px}
"""


def _inline(text: str) -> str:
    """Escape HTML, then render `code` and *emphasis* and **bold** minimal Markdown."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<i>\1</i>", s)
    return s


def to_html(doc: Document) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(doc.title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(doc.title)}</h1>"]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            parts.append(f"<h{b[1] + 1}>{_inline(b[2])}</h{b[1] + 1}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            t: Table = b[1]
            cap = (_inline(t.caption) + " " if t.caption else "") + f"(table: <code>{html.escape(t.csv)}</code>)"
            parts.append(f"<div class='cap'>{cap}</div>")
            if t.frame.empty:
                parts.append("<p>(no rows)</p>")
                continue
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.frame.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                           for row in t.frame.itertuples(index=False))
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "fig":
            f: Figure = b[1]
            data = base64.b64encode(f.path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(f.caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption class='cap'>{_inline(f.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- traceability -----------------------------------------------------------------------

_NUM = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w])")


def _sig_digits(token: str) -> int:
    mant = re.split(r"[eE]", token)[0].lstrip("+-")
    digits = mant.replace(".", "").lstrip("0")
    return max(1, len(digits))


def numbers_in_markdown(md: str) -> list[str]:
    """Numeric tokens of a Markdown text, skipping code spans and link/image targets."""
    md = re.sub(r"`[^`]*`", " ", md)
    md = re.sub(r"\]\([^)]*\)", "]", md)
    return _NUM.findall(md)


def check_traceable(out_dir) -> list[str]:
    """The numbers of ``out_dir/report.md`` that no cell of ``out_dir/tables/*.csv``
    rounds to (at the number's own significant digits). Empty list: all traceable."""
    out_dir = Path(out_dir)
    values = set()
    for csv in sorted((out_dir / "tables").glob("*.csv")):
        try:
            df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            continue
        for col in df.columns:
            for tok in _NUM.findall(" ".join(df[col].tolist()) + " " + str(col)):
                values.add(float(tok))
    vals = np.array(sorted(v for v in values if math.isfinite(v)))
    rounded = {d: {float(f"{v:.{d}g}") for v in vals} for d in range(1, 10)}
    missing = []
    for tok in numbers_in_markdown((out_dir / "report.md").read_text(encoding="utf-8")):
        d = min(_sig_digits(tok), 9)
        x = float(tok)
        if x not in rounded[d] and float(f"{x:.{d}g}") not in rounded[d]:
            missing.append(tok)
    return missing
