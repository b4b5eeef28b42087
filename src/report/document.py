"""A small document model rendered to Markdown and to self-contained HTML."""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Doc:
    """A small document model rendered to Markdown and to self-contained HTML."""
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, level: int, text: str):
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str):
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("bullets", items))

    def table(self, rows: list[dict]):
        if rows:
            self.blocks.append(("table", rows))

    def image(self, path: Path, caption: str):
        self.blocks.append(("image", path, caption))

    def link(self, path: Path, text: str):
        self.blocks.append(("link", path, text))


def to_markdown(doc: Doc, base: Path) -> str:
    out = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "paragraph":
            out.append(block[1])
        elif kind == "bullets":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            columns = list(block[1][0])
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |"
                      for row in block[1]]
            out.append("\n".join(lines))
        elif kind == "image":
            out.append(f"![{block[2]}]({_rel(block[1], base)})")
        elif kind == "link":
            out.append(f"- [{block[2]}]({_rel(block[1], base)})")
    return "\n\n".join(out) + "\n"


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;
line-height:1.45;color:#222}table{border-collapse:collapse;font-size:0.85em}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}
td:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
figcaption{font-size:0.85em;color:#555}"""


def to_html(doc: Doc, base: Path, title: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{HTML_STYLE}</style></head><body>"]
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "paragraph":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "bullets":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            columns = list(block[1][0])
            head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in columns)
                           + "</tr>" for r in block[1])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "image":
            data = base64.b64encode(block[1].read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(block[2])}' "
                       f"src='data:image/png;base64,{data}'><figcaption>"
                       f"{html.escape(block[2])}</figcaption></figure>")
        elif kind == "link":
            out.append(f"<p><a href='{html.escape(_rel(block[1], base))}'>"
                       f"{html.escape(block[2])}</a> (file next to the run)</p>")
    out.append("</body></html>")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown `code` spans to <code>; everything else escaped."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


