"""``index.html``: the leaderboard as one self-contained static page (no server, no external asset, no web font).

Inline CSS, one ``<table>`` per protocol (the main one first), the scatter as inline SVG drawn here (no matplotlib),
the cards not ranked, and a small inline sort script: a click on a column header (or ``index.html#sort=<column>``
on load: the same function) sorts the rows by that column, numbers by their ``data-value``, not-measured last, best
first, a second click reverses; ``aria-sort`` says the order. Every string from a card is HTML-escaped and no card
content is inside ``<script>``; a Content-Security-Policy allows only the page's own style and script (by hash).
"""
from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Sequence

from .leaderboard import BenchCard, Column, Table, cell_interval, cell_value
from .pareto import pareto_front
from .writers import cell_text, column_n, header_text, ranking_text

__all__ = ["SORT_SCRIPT", "STYLE", "Point", "scatter_points", "scatter_svg", "page_html"]

Point = tuple[float, "float | None", "float | None", float, "float | None", "float | None", str]

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#1b1b1b;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}.meta{color:#555}
.wrap{overflow-x:auto}table{border-collapse:collapse;margin:.5em 0}
th,td{border-bottom:1px solid #ddd;padding:.3em .55em;text-align:right;white-space:nowrap}
th{background:#f3f3f3;vertical-align:bottom}td.text,th.text{text-align:left}
th button{font:inherit;font-weight:600;background:none;border:0;padding:0;cursor:pointer;color:inherit;text-align:inherit}
th[aria-sort=ascending] button::after{content:" \\25B2"}th[aria-sort=descending] button::after{content:" \\25BC"}
tbody tr:nth-child(even){background:#fafafa}tbody tr:hover{background:#eef4ff}
code{font-size:.9em}svg text{font:11px system-ui,sans-serif}
"""

SORT_SCRIPT = """
(function () {
  "use strict";
  function key(td, numeric) {
    var v = td ? td.getAttribute("data-value") : null;
    if (v === null || v === "") { return null; }
    return numeric ? parseFloat(v) : v.toLowerCase();
  }
  function compare(x, y) { return x < y ? -1 : (x > y ? 1 : 0); }
  function sortBy(th, descending) {
    var row = th.parentNode, heads = Array.prototype.slice.call(row.children);
    var table = row.closest("table"), body = table.tBodies[0];
    var idx = heads.indexOf(th), numeric = th.getAttribute("data-kind") !== "text";
    var nameIdx = heads.findIndex(function (h) { return h.getAttribute("data-col") === "name"; });
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[idx], numeric), y = key(b.cells[idx], numeric);
      if (x === null || y === null) {
        if (x !== y) { return x === null ? 1 : -1; }
      } else if (compare(x, y) !== 0) {
        return descending ? -compare(x, y) : compare(x, y);
      }
      return nameIdx < 0 ? 0 : compare(key(a.cells[nameIdx], false), key(b.cells[nameIdx], false));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    heads.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    document.documentElement.setAttribute("data-sorted", th.getAttribute("data-col"));
  }
  function onHeader(th) {
    var now = th.getAttribute("aria-sort");
    var best = th.getAttribute("data-better") === "higher";
    sortBy(th, (now === "ascending" || now === "descending") ? now === "ascending" : best);
  }
  var heads = document.querySelectorAll("th[data-col]");
  Array.prototype.forEach.call(heads, function (th) {
    th.querySelector("button").addEventListener("click", function () { onHeader(th); });
  });
  var m = /(?:^#|&)sort=([^&]*)/.exec(window.location.hash);
  if (m) {
    var wanted = decodeURIComponent(m[1]);
    Array.prototype.forEach.call(heads, function (th) {
      if (th.getAttribute("data-col") === wanted) { th.setAttribute("aria-sort", "none"); onHeader(th); }
    });
  }
  document.documentElement.setAttribute("data-ready", "1");
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


# ------------------------------------------------------------------------------------------------ scatter
def scatter_points(cards: Sequence[BenchCard]) -> list[Point]:
    """``(x, x_low, x_high, y, y_low, y_high, name)`` per entry with both AutoAttack accuracy (x) and top-k Kendall
    tau (y) measured."""
    from .leaderboard import column

    xc, yc = column("autoattack_acc"), column("topk_tau")
    out: list[Point] = []
    for c in cards:
        x, y = cell_value(c.entry, xc), cell_value(c.entry, yc)
        if isinstance(x, float) and isinstance(y, float):
            out.append((x, *cell_interval(c.entry, xc), y, *cell_interval(c.entry, yc), str(c.entry.get("name"))))
    return out


def _ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Axis range ``[lo, hi]`` widened to tenths (at least 0.2 wide), and its ticks."""
    a, b = math.floor(lo * 10 + 1e-9) / 10, math.ceil(hi * 10 - 1e-9) / 10
    if b - a < 0.2:
        a, b = a - 0.1, b + 0.1
    step = 0.1 if b - a <= 0.6 else (0.2 if b - a <= 1.2 else 0.5)
    first = math.ceil(a / step - 1e-9) * step
    return a, b, [round(first + k * step, 6) for k in range(int((b - first) / step + 1e-9) + 1)]


_W, _H, _L, _R, _T, _B = 720, 460, 64, 24, 20, 52


def _axes_svg(xr: tuple[float, float, list[float]], yr: tuple[float, float, list[float]], sx, sy) -> list[str]:
    out = [f'<rect x="{_L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" fill="none" stroke="#999"/>']
    for t in xr[2]:
        out.append(f'<line x1="{sx(t):.1f}" y1="{_T}" x2="{sx(t):.1f}" y2="{_H - _B}" stroke="#eee"/>'
                   f'<text x="{sx(t):.1f}" y="{_H - _B + 16}" text-anchor="middle">{t:g}</text>')
    for t in yr[2]:
        out.append(f'<line x1="{_L}" y1="{sy(t):.1f}" x2="{_W - _R}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{_L - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<text x="{(_L + _W - _R) / 2}" y="{_H - 12}" text-anchor="middle">AutoAttack accuracy (robust '
               'accuracy, higher is better)</text>')
    out.append(f'<text transform="translate(16 {(_T + _H - _B) / 2}) rotate(-90)" text-anchor="middle">top-k Kendall '
               'tau (interpretation robustness, higher is better)</text>')
    return out


def scatter_svg(points: Sequence[Point]) -> str:
    """The scatter as inline SVG: each point with its interval bars (x and y), the Pareto front (maximising both) as
    a step line, the points labelled by name (escaped). A pure function of ``points``."""
    if not points:
        return '<p class="meta">No entry of the main protocol has both AutoAttack accuracy and top-k tau.</p>'
    xs = [v for p in points for v in (p[0], p[1], p[2]) if v is not None]
    ys = [v for p in points for v in (p[3], p[4], p[5]) if v is not None]
    xr, yr = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))

    def sx(v: float) -> float:
        return _L + (v - xr[0]) / (xr[1] - xr[0]) * (_W - _L - _R)

    def sy(v: float) -> float:
        return _H - _B - (v - yr[0]) / (yr[1] - yr[0]) * (_H - _T - _B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" '
           'role="img" aria-label="AutoAttack accuracy against top-k Kendall tau, with the Pareto front">']
    out += _axes_svg(xr, yr, sx, sy)
    front = sorted((points[i][0], points[i][3]) for i in pareto_front([(p[0], p[3]) for p in points]))
    path = [f"M{sx(front[0][0]):.1f},{sy(front[0][1]):.1f}"]
    for (x0, _), (x1, y1) in zip(front, front[1:]):
        path.append(f"L{sx(x0):.1f},{sy(y1):.1f}L{sx(x1):.1f},{sy(y1):.1f}")
    out.append(f'<path class="front" d="{"".join(path)}" fill="none" stroke="#c0392b" stroke-width="1.5"/>')
    for x, xlo, xhi, y, ylo, yhi, name in points:
        bars = f'M{sx(xlo if xlo is not None else x):.1f},{sy(y):.1f}H{sx(xhi if xhi is not None else x):.1f}' \
               f'M{sx(x):.1f},{sy(ylo if ylo is not None else y):.1f}V{sy(yhi if yhi is not None else y):.1f}'
        out.append(f'<g class="point"><title>{_e(name)}: AutoAttack {x:.3f}, tau {y:.3f}</title>'
                   f'<path d="{bars}" stroke="#888" stroke-width="1"/>'
                   f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="#1f77b4"/>'
                   f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}">{_e(name)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ tables
def _header(cards: Sequence[BenchCard], col: Column, sort: str) -> str:
    kind = "text" if col.kind == "text" else "number"
    better = col.better or "none"
    order = ("descending" if col.descending else "ascending") if col.key == sort else "none"
    return (f'<th scope="col" class="{kind}" data-col="{_e(col.key)}" data-kind="{kind}" data-better="{better}" '
            f'aria-sort="{order}"><button type="button">{_e(header_text(cards, col))}</button></th>')


def _cell(card: BenchCard, col: Column, rank: int, header_n: int | None) -> str:
    value = cell_value(card.entry, col, rank)
    data = "" if value is None else (" ".join(value.split()) if isinstance(value, str) else repr(float(value)))
    kind = ' class="text"' if col.kind == "text" else ""
    return f'<td{kind} data-value="{_e(data)}">{_e(cell_text(card.entry, col, rank, header_n))}</td>'


def table_html(table: Table) -> str:
    """One protocol's ``<section>``: heading, hash, ranking, and its ``<table>`` (rows in rank order)."""
    ns = {c.key: column_n(table.cards, c) for c in table.columns}
    heads = "".join(_header(table.cards, c, table.sort[0]) for c in table.columns)
    rows = "\n".join("<tr>" + "".join(_cell(card, c, i, ns[c.key]) for c in table.columns) + "</tr>"
                     for i, card in enumerate(table.cards, 1))
    where = "main ranking" if table.main else "another protocol: ranked apart"
    return (f'<section><h2>{_e(table.title)} <span class="meta">({where})</span></h2>\n'
            f'<p class="meta">Protocol sha256 <code>{_e(table.protocol)}</code>; {len(table.cards)} entries; '
            f'{_e(ranking_text(table))}. Click a column header to sort by it; again to reverse.</p>\n'
            f'<div class="wrap"><table data-protocol="{_e(table.protocol)}">\n<thead><tr>{heads}</tr></thead>\n'
            f'<tbody>\n{rows}\n</tbody></table></div></section>')


def page_html(tables: Sequence[Table], invalid: Sequence[tuple[str, str]], made: str) -> str:
    """The whole ``index.html``."""
    main = next((t for t in tables if t.main), None)
    svg = scatter_svg(scatter_points(main.cards) if main else [])
    bad = "\n".join(f"<li><code>{_e(p)}</code>: {_e(r)}</li>" for p, r in invalid) or "<li>None.</li>"
    csp = f"default-src 'none'; style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SORT_SCRIPT)}"
    body = "\n".join(table_html(t) for t in tables) or '<p class="meta">No valid card.</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>IDLS-Bench leaderboard</title>
<style>{STYLE}</style>
</head>
<body>
<h1>IDLS-Bench leaderboard</h1>
<p class="meta">Made {_e(made)} by <code>defend bench</code>. A cell reads value ± half-width of its 95 % interval
(value [low, high] where the interval is lopsided); - is not measured; n is the number of inputs behind a figure.</p>
{body}
<section><h2>Robust accuracy against interpretation robustness</h2>
{svg}
</section>
<section><h2>Cards not ranked</h2>
<ul class="invalid">
{bad}
</ul></section>
<script>{SORT_SCRIPT}</script>
</body>
</html>
"""
