"""The HTML page skeleton and inline CSS of the report (no external CSS, JS or fonts: it must open offline)."""

from __future__ import annotations

CSS = """
:root { --fg: #1d2430; --muted: #5b6473; --line: #d9dee6; --bg-alt: #f5f7fa; --accent: #2457a6; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1180px; padding: 24px 28px 64px; line-height: 1.45; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.2rem; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 16px; font-size: 0.92rem; }
.summary { background: var(--bg-alt); border-left: 4px solid var(--accent); padding: 10px 14px; margin: 16px 0; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 0.88rem; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: right; white-space: nowrap; }
th { background: var(--bg-alt); font-weight: 600; white-space: normal; vertical-align: bottom; max-width: 110px; }
td.l, th.l { text-align: left; }
td.path { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.8rem;
          white-space: normal; word-break: break-all; max-width: 420px; }
tr.oracle td { font-style: italic; color: var(--muted); }
tr.group-start td { border-top: 2px solid var(--line); }
.best { font-weight: 700; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px;
          vertical-align: -1px; }
.definition { background: var(--bg-alt); padding: 10px 14px; border-radius: 4px; font-size: 0.9rem; }
.note, .missing { color: #8a4b00; background: #fff6e5; padding: 6px 10px; border-radius: 4px; font-size: 0.88rem; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.86rem; margin-top: 4px; max-width: 900px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 0 24px; }
details pre { background: var(--bg-alt); padding: 10px; font-size: 0.78rem; overflow-x: auto; }
.scroll { overflow-x: auto; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
{body}
</body>
</html>
"""


def page(title: str, body: str) -> str:
    """A complete HTML document; ``title`` must already be escaped."""
    return PAGE.format(title=title, css=CSS, body=body)
