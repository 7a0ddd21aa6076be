"""One-line error messages for the command line.

The CLI catches the errors a user can cause (bad config values, bad data, unusable checkpoints) and prints
``defend <cmd>: error: <one line>`` with exit status 2; anything else is a bug and keeps its traceback
(set ``DEFEND_DEBUG=1`` to see the traceback of user errors too).
"""
from __future__ import annotations

import argparse
import os
import re

__all__ = ["USER_ERRORS", "one_line", "debug_enabled"]

# ValueError covers CheckpointError, jsonargparse's instantiation errors and the input checks of the attack core;
# TypeError a config key a class does not accept; KeyError a missing config key; OSError unreadable files.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, argparse.ArgumentError)

_NOISE = re.compile(r"^(Does not validate against any of the Union subtypes|Subtypes: |Given value( type)?: |"
                    r"Expected a <class 'NoneType'>|Errors:$)")


def debug_enabled() -> bool:
    """``DEFEND_DEBUG=1`` re-raises user errors with their traceback."""
    return os.environ.get("DEFEND_DEBUG", "") not in ("", "0", "false", "no")


def _worker_error(text: str) -> str | None:
    """The original error of a DataLoader worker (``Caught ValueError in DataLoader worker ... Original Traceback``)."""
    if "Original Traceback" not in text:
        return None
    last = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-1]
    return last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last


def _nested(text: str) -> str:
    """Condense jsonargparse's nested report to the path of the first real error, joined on one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    parts: list[str] = []
    for s in lines:
        s = s[2:] if s.startswith("- ") else s
        if _NOISE.match(s):
            continue
        parts.append(s)
        if not s.endswith(":"):
            break  # the first complete error; further alternatives of a union add nothing
    given = next((ln[len("Given value: "):] for ln in lines if ln.startswith("Given value: ")), "")
    if given and len(given) < 60 and not re.match(r"^(Namespace|NestedArg)\(", given) and not any("Got value" in p for p in parts):
        parts.append(f"(got {given!r})")
    return " ".join(parts) if parts else (lines[0] if lines else "")


def one_line(exc: BaseException) -> str:
    """A single line naming the problem (``KeyError`` quotes dropped, nested reports condensed)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    text = _worker_error(text) or text
    if "\n" in text.strip():
        text = _nested(text)
    text = " ".join(text.split())
    return text or type(exc).__name__
