"""Check a ``defend bench`` page in a real browser (headless Chromium, Debian's ``chromium``).

    python benchmarks/browser_check.py runs/bench/index.html --out runs/bench/browser [--column clean_acc]

Opens ``index.html`` in headless Chromium driven over the DevTools protocol (``--remote-debugging-pipe``: a pipe,
JSON messages, no websocket and no dependency), saves ``before.png``, clicks the header of a column with a real
mouse event (pressed and released at its centre), saves ``after.png`` (1400 x 900), clicks again, and checks: no
console message, uncaught exception or browser log entry at all (a script error, a Content-Security-Policy refusal,
a blocked load would be one), the script ran (``data-ready`` on ``<html>``), after the first click the rows of the
first table are in the column's order (best first, not measured last, ties by name) with ``aria-sort`` set and the
other tables untouched, after the second click in the reverse order. ``--column`` defaults to the first numeric
column whose sort reorders the first table. Exit 0 when every check passes, 1 with the failures listed, 2 when Chromium or the page is missing.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["PageTable", "parse_page", "expected_order", "Chromium", "check_page", "main"]


@dataclass
class PageTable:
    """A ``<table>`` of the page: its headers' attributes and its rows (per cell: ``data-value`` and text)."""

    attrs: dict[str, str]
    headers: list[dict[str, str]] = field(default_factory=list)
    rows: list[list[tuple[str | None, str]]] = field(default_factory=list)

    def column(self, key: str) -> int | None:
        return next((i for i, h in enumerate(self.headers) if h.get("data-col") == key), None)

    def values(self, key: str) -> list[str | None]:
        i = self.column(key)
        return [] if i is None else [r[i][0] for r in self.rows]


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[PageTable] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value) of every src / href / action
        self.scripts: list[str] = []
        self.root: dict[str, str] = {}
        self._cell: list | None = None
        self._where = ""  # "thead", "tbody", "th", "script" or ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.links += [(tag, k, v) for k, v in a.items() if k in ("src", "href", "xlink:href", "action", "srcset")]
        if tag == "html":
            self.root = a
        elif tag == "table":
            self.tables.append(PageTable(a))
        elif tag in ("thead", "tbody"):
            self._where = tag
        elif tag == "th" and self.tables and self._where == "thead":
            self.tables[-1].headers.append({**a, "text": ""})
            self._where = "th"
        elif tag == "tr" and self.tables and self._where == "tbody":
            self.tables[-1].rows.append([])
        elif tag == "td" and self.tables and self.tables[-1].rows and self._where == "tbody":
            self._cell = [a.get("data-value"), ""]
        elif tag == "script":
            self._where = "script"
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.tables[-1].rows[-1].append((self._cell[0], self._cell[1].strip()))
            self._cell = None
        elif tag == "th" and self._where == "th":
            self._where = "thead"
        elif tag in ("thead", "tbody", "script"):
            self._where = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1] += data
        elif self._where == "script":
            self.scripts[-1] += data
        elif self._where == "th":
            self.tables[-1].headers[-1]["text"] += data


def parse_page(text: str) -> _Reader:
    """The page read with :mod:`html.parser`: ``.tables`` (:class:`PageTable`), ``.links``, ``.scripts``, ``.root``
    (the ``<html>`` attributes, where the script marks ``data-ready`` / ``data-sorted``)."""
    reader = _Reader()
    reader.feed(text)
    reader.close()
    return reader


def expected_order(table: PageTable, key: str, descending: bool) -> list[int]:
    """The row indices in the order sorting by ``key`` gives: by ``data-value`` (numbers as numbers), not-measured
    last, ties by name."""
    i, name = table.column(key), table.column("name")
    numeric = table.headers[i].get("data-kind") != "text"

    def name_of(r: int) -> str:
        return (table.rows[r][name][0] or "").lower() if name is not None else ""

    rows = sorted(range(len(table.rows)), key=name_of)
    present = [r for r in rows if table.rows[r][i][0] not in (None, "")]
    missing = [r for r in rows if table.rows[r][i][0] in (None, "")]
    present.sort(key=lambda r: float(table.rows[r][i][0]) if numeric else table.rows[r][i][0].lower(),
                 reverse=descending)
    return present + missing


def _pick_column(table: PageTable) -> str:
    for h in table.headers:
        key = h.get("data-col", "")
        if h.get("data-kind") == "number" and key != "rank":
            order = expected_order(table, key, h.get("data-better") == "higher")
            if order != list(range(len(table.rows))):
                return key
    return "name"


class Chromium:
    """Headless Chromium driven over the DevTools protocol on ``--remote-debugging-pipe`` (fds 3 / 4, JSON messages
    ended by NUL: no websocket, no dependency), one page attached; ``events`` keeps every event it sent."""

    def __init__(self, binary: str, profile: str, size: tuple[int, int] = (1400, 900)) -> None:
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def fds() -> None:
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
                                     pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", page=True)
        self.call("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1],
                                                         "deviceScaleFactor": 1, "mobile": False}, page=True)

    def _recv(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._in], [], [], max(0.0, end - time.monotonic()))
            chunk = os.read(self._in, 1 << 20) if ready else b""
            if not chunk:
                raise TimeoutError("chromium did not answer (crashed or timed out)")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, page: bool = False, timeout: float = 30) -> dict:
        """Send one command (to the page's session with ``page``) and return its result."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        while True:
            answer = self._recv(timeout)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def load(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, page=True)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._recv(30))

    def evaluate(self, expression: str):
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, page=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"evaluating {expression[:60]!r}: {answer['exceptionDetails'].get('text')}")
        return answer["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed, released) at the centre of the element ``selector`` matches."""
        x, y = self.evaluate(f"(function(){{var b=document.querySelector({json.dumps(selector)});b.scrollIntoView();"
                             "var r=b.getBoundingClientRect();return [r.x+r.width/2,r.y+r.height/2];})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                      page=True)

    def screenshot(self, path: Path) -> None:
        self.evaluate("window.scrollTo(0, 0)")
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, page=True)["data"]))

    def console(self) -> list[str]:
        """Every console message, uncaught exception and browser log entry (a CSP refusal, a failed load)."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled":
                out.append(f"console.{p.get('type')}: " + " ".join(str(a.get("value", a.get("description")))
                                                                    for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif e.get("method") == "Log.entryAdded":
                out.append(f"log {p['entry'].get('level')}: {p['entry'].get('text')}")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._in)
        os.close(self._out)


def _sorted_check(before: _Reader, after: _Reader, key: str, descending: bool) -> list[str]:
    """Whether the first table of ``after`` (the one clicked) holds ``before``'s rows in column ``key``'s order, and
    the other tables are as they were."""
    problems = []
    if after.root.get("data-sorted") != key:
        problems.append(f"the page's script did not sort by {key!r} (data-sorted={after.root.get('data-sorted')!r})")
    for n, (t0, t1) in enumerate(zip(before.tables, after.tables)):
        i = t0.column(key)
        if n > 0:
            if t1.rows != t0.rows:
                problems.append(f"table {n + 1} was reordered by a click on another table")
            continue
        want = [t0.rows[r] for r in expected_order(t0, key, descending)]
        where = f"table {t0.attrs.get('data-protocol', '?')[:12]}"
        if t1.rows != want:
            problems.append(f"{where}: rows not in {key} order ({'descending' if descending else 'ascending'})")
        if t1.headers[i].get("aria-sort") != ("descending" if descending else "ascending"):
            problems.append(f"{where}: aria-sort of {key} is {t1.headers[i].get('aria-sort')!r} after the click")
    return problems


def check_page(page: Path, out: Path, chromium: str, key: str | None = None) -> list[str]:
    """Every failed check (empty: the page renders, logs nothing, and a click on a header sorts by that column, a
    second click reverses); writes before.png / after.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    dom = "document.documentElement.outerHTML"
    with tempfile.TemporaryDirectory(prefix="browser-check-") as profile:
        browser = Chromium(chromium, profile)
        try:
            browser.load(page.resolve().as_uri())
            before = parse_page(browser.evaluate(dom))
            if not before.tables:
                return browser.console() + ["no table on the page"]
            browser.screenshot(out / "before.png")
            key = key or _pick_column(before.tables[0])
            if before.tables[0].column(key) is None:
                return [f"the first table has no column {key!r}"]
            head = before.tables[0].headers[before.tables[0].column(key)]
            best = head.get("data-better") == "higher"
            browser.click(f'th[data-col="{key}"] button')
            first = parse_page(browser.evaluate(dom))
            browser.screenshot(out / "after.png")
            browser.click(f'th[data-col="{key}"] button')
            second = parse_page(browser.evaluate(dom))
            console = browser.console()
        finally:
            browser.close()
    problems = [f"console: {line}" for line in console]
    if before.root.get("data-ready") != "1":
        problems.append("the page's script did not run (no data-ready on <html>)")
    problems += _sorted_check(before, first, key, best) + _sorted_check(before, second, key, not best)
    print(f"clicked {key} twice: {len(before.tables)} table(s), {sum(len(t.rows) for t in before.tables)} row(s)")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("page", type=Path, help="the index.html defend bench wrote")
    p.add_argument("--out", type=Path, required=True, help="folder for before.png / after.png")
    p.add_argument("--column", help="the column to sort by (data-col; default: one that reorders the rows)")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = p.parse_args(argv)
    if not args.chromium:
        print("browser_check: error: no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    if not args.page.is_file():
        print(f"browser_check: error: no such page: {args.page}", file=sys.stderr)
        return 2
    problems = check_page(args.page, args.out, args.chromium, args.column)
    for line in problems:
        print(f"FAIL {line}")
    print("browser check: " + ("passed" if not problems else f"{len(problems)} problem(s)") +
          f"; screenshots in {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
