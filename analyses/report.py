"""A self-contained HTML report: sections of caption + plotly figure or table, plotly.js inlined once (works
offline), plus a JSON summary of the numbers."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return round(x, 6)
    return x


def table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(f'{r[c]:.3f}' if isinstance(r[c], float) else str(r[c]))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Report:
    title: str
    intro: str = ""
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (title, caption html, body html)
    summary: dict[str, Any] = field(default_factory=dict)
    _js_included: bool = False

    def add(self, title: str, caption: str, fig: Any = None, rows: list[dict[str, Any]] | None = None) -> None:
        body = ""
        if rows:
            body += table_html(rows)
        if fig is not None:
            body += fig.to_html(full_html=False, include_plotlyjs="inline" if not self._js_included else False)
            self._js_included = True
        self.sections.append((title, caption, body))

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        toc = "".join(f'<li><a href="#s{i}">{html.escape(t)}</a></li>' for i, (t, _, _) in enumerate(self.sections))
        parts = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "th{background:#f3f3f3}.cap{color:#444;max-width:900px}section{margin-bottom:2.5em}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1><div class='cap'>{self.intro}</div><ol>{toc}</ol>",
        ]
        for i, (t, cap, body) in enumerate(self.sections):
            parts.append(f"<section id='s{i}'><h2>{html.escape(t)}</h2><p class='cap'>{cap}</p>{body}</section>")
        parts.append("</body></html>")
        (out / "index.html").write_text("".join(parts))
        (out / "summary.json").write_text(json.dumps(_jsonable(self.summary), indent=2))
        return out / "index.html"
