"""Pieces of a self-contained HTML page: escaped text, tables, inlined images, the page itself.

Everything a page needs is inside it (styles, scripts, images as data URLs), so it opens from
a USB stick through file:// with no network. Text from run folders (config values, file
names, Markdown tables written by `voxgen evaluate`) is escaped on the way in.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from collections.abc import Sequence


class Raw(str):
    """HTML that is already safe (built here), put into a table cell as it is."""


def esc(value) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value), quote=True)


def table(headers: Sequence[str], rows: Sequence[Sequence], cls: str = "", align: Sequence[str] = ()) -> Raw:
    """An HTML table; cells are escaped unless they are `Raw`. align: 'left'/'right' per column."""

    def cell(tag: str, i: int, value) -> str:
        a = align[i] if i < len(align) and align[i] in ("left", "right") else ""
        style = f' class="{a}"' if a else ""
        return f"<{tag}{style}>{esc(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "\n".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    attr = f' class="{esc(cls)}"' if cls else ""
    return Raw(f"<table{attr}><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>")


def _row_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_html(text: str) -> Raw:
    """The Markdown `voxgen evaluate` writes (a '## title', pipe tables, '- ' notes) as HTML.

    Only those constructs are understood; any other line becomes a paragraph of plain text.
    """
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            out.append(f"<h3>{esc(line.lstrip('#').strip())}</h3>")
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_pipe_table(block))
        elif re.match(r"\s*[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"\s*[-*] ", lines[i]):
                item = re.sub(r"^\s*[-*] ", "", lines[i])
                items.append(f"<li>{esc(item)}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            out.append(f"<p>{esc(line)}</p>")
            i += 1
    return Raw("\n".join(out))


def _pipe_table(block: list[str]) -> str:
    headers = _row_cells(block[0])
    rows = [_row_cells(line) for line in block[1:]]
    align: list[str] = []
    if rows and all(re.fullmatch(r":?-{3,}:?", c) for c in rows[0]):
        align = ["right" if c.endswith(":") else "left" for c in rows[0]]
        rows = rows[1:]
    return table(headers, rows, "data", align)


def csv_html(text: str) -> Raw:
    """A CSV file (header row first) as a table; numbers are right-aligned and shown to 4 digits."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        return Raw("<p>(empty)</p>")
    headers, body = rows[0], rows[1:]

    def shown(value: str) -> str:
        try:
            number = float(value)
        except ValueError:
            return value
        return value if number == int(number) and "." not in value else f"{number:.4g}"

    align = ["right" if body and all(_is_number(r[i]) for r in body if i < len(r)) else "left" for i in range(len(headers))]
    return table(headers, [[shown(v) for v in r] for r in body], "data", align)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def png_img(data: bytes, alt: str) -> Raw:
    return Raw(f'<img class="figure" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def inline_script(source: str, module: bool = False) -> Raw:
    """A <script> element holding `source`.

    An HTML parser ends a script at the first `</script`, and `<!--` inside one changes how it
    looks for the end; neither may appear as such. `<\\/` and `<\\!` mean the same characters
    inside JavaScript strings, templates and regular expressions, where bundles have them.
    """
    safe = re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE).replace("<!--", "<\\!--")
    kind = ' type="module"' if module else ""
    return Raw(f"<script{kind}>\n{safe}\n</script>")


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1b1f24; background: #f6f7f9; }
header { background: #1b2a3a; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; color: #c9d4e0; }
nav { padding: 6px 28px; background: #e8ecf1; }
nav a { margin-right: 14px; color: #1f4f7a; text-decoration: none; }
main { padding: 0 28px 40px; max-width: 1100px; }
section { background: #fff; border: 1px solid #dde2e8; border-radius: 6px; padding: 8px 18px 14px; margin-top: 18px; }
h2 { font-size: 17px; margin: 8px 0 10px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
table { border-collapse: collapse; margin: 4px 0 10px; }
th, td { border-bottom: 1px solid #e3e7ec; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th { font-weight: 600; color: #444; }
td.right, th.right { text-align: right; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 12.5px; }
.note { color: #5a6470; }
.bad { color: #b3261e; font-weight: 600; }
.good { color: #1e7a35; }
.tag { display: inline-block; padding: 0 6px; border-radius: 3px; background: #e6eefc; color: #1f4f7a;
  font-size: 12px; margin-left: 4px; }
.kv th { width: 190px; }
svg.chart { display: block; margin: 6px 0; background: #fff; }
svg .grid { stroke: #eef0f3; }
svg .axis { stroke: #9aa3ad; }
svg .tick, svg .legend text { font-size: 11px; fill: #555; }
svg .chart-title { font-size: 13px; font-weight: 600; fill: #222; }
svg .curve { fill: none; stroke-width: 1.6; }
svg .event-line { stroke-dasharray: 3 3; stroke-width: 1; opacity: 0.6; }
svg .guard-event { cursor: help; }
img.figure { max-width: 100%; border: 1px solid #e3e7ec; }
.viewer-grid { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.viewer-pane h3 { margin: 6px 0; }
.viewer-canvas { width: 100%; height: 210px; background: #000; }
.viewer-canvas canvas { width: 100%; height: 100%; display: block; }
.sliders { display: grid; grid-template-columns: 80px 1fr 70px; gap: 4px 10px; align-items: center;
  max-width: 640px; margin: 10px 0; }
.sliders input { width: 100%; }
#viewer-status { color: #5a6470; }
"""


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], scripts: Sequence[str] = ()) -> str:
    """The whole document: sections are (id, heading, inner HTML); scripts are already <script> elements."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(heading)}</a>' for sid, heading, _ in sections)
    body = "\n".join(f'<section id="{esc(sid)}"><h2>{esc(heading)}</h2>\n{inner}\n</section>' for sid, heading, inner in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # No request may leave the page: everything it shows is inside it.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data: blob:; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline' blob:; worker-src blob:; "
        'connect-src data: blob:">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>\n<nav>{nav}</nav>\n<main>\n{body}\n</main>\n"
        + "\n".join(scripts)
        + "\n</body>\n</html>\n"
    )
