"""One-line error messages for the command line.

The CLI catches the errors a user can cause (bad config values, bad data, unusable checkpoints) and prints
``defend <cmd>: error: <one line>`` with exit status 2; anything else is a bug and keeps its traceback
(set ``DEFEND_DEBUG=1`` to see the traceback of user errors too).
"""
from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable

from .class_paths import import_denied

__all__ = ["USER_ERRORS", "one_line", "did_you_mean", "debug_enabled", "quiet_lightning"]

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
    literals = [m.group(1) for m in (re.match(r"^- Expected a typing\.Literal\[(.*)\]$", ln) for ln in lines) if m]
    if len(literals) > 1 and parts and parts[-1].startswith("Expected a typing.Literal["):
        parts[-1] = f"Expected one of: {', '.join(literals)}"  # every alternative of a union of choices
    given = next((ln[len("Given value: "):] for ln in lines if ln.startswith("Given value: ")), "")
    if given and len(given) < 60 and not re.match(r"^(Namespace|NestedArg)\(", given) and not any("Got value" in p for p in parts):
        parts.append(f"(got {given!r})")
    return " ".join(parts) if parts else (lines[0] if lines else "")


def _init_parameters(class_path: str) -> list[str]:
    """The keyword arguments of the class ``class_path`` names, if its module is already imported (never imports:
    the name comes from user input)."""
    module, _, name = class_path.rpartition(".")
    target = getattr(sys.modules.get(module), name, None)
    if not inspect.isclass(target):
        return []
    try:
        params = inspect.signature(target.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# messages that name a key that does not exist: (pattern, where the valid keys come from)
_UNKNOWN_KEY = (
    re.compile(r"Problem with given class_path '(?P<cls>[\w.]+)': Option '(?P<key>[\w.]+)' is not accepted"),
    re.compile(r"does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"[Uu]nrecognized arguments: --(?P<key>[\w.]+)"),
    re.compile(r"Key '(?P<key>[\w.]+)' is not expected"),
)


def did_you_mean(text: str, valid_keys: Iterable[str] | None = None) -> str:
    """``" (did you mean 'max_epochs'?)"`` when ``text`` names a key that does not exist and a valid key is close
    to it: the parameters of the class the message names (only if already imported), else ``valid_keys`` (the
    parser's keys, dotted). ``""`` when nothing is close enough."""
    for pattern in _UNKNOWN_KEY:
        m = pattern.search(text)
        if not m:
            continue
        key = m.group("key")
        cls = m.groupdict().get("cls")
        known = _init_parameters(cls) if cls else sorted(set(valid_keys or ()))
        if not known:
            return ""
        prefix, _, leaf = key.rpartition(".")
        if prefix and not cls:  # compare within the same section (trainer.max_epoch ~ trainer.max_epochs)
            known = [k[len(prefix) + 1:] for k in known if k.startswith(prefix + ".")]
        close = difflib.get_close_matches(leaf, [k for k in known if k != leaf], n=1, cutoff=0.75)
        if close:
            dashes = "--" if text[max(m.start("key") - 2, 0):m.start("key")] == "--" else ""
            return f" (did you mean '{dashes}{prefix + '.' if prefix and not cls else ''}{close[0]}'?)"
        return ""
    return ""


def one_line(exc: BaseException) -> str:
    """A single line naming the problem (``KeyError`` quotes dropped, nested reports condensed, a did-you-mean for
    a misspelt key: :func:`did_you_mean`, with the parser's keys when the CLI attached them as ``valid_keys``)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    text = _worker_error(text) or text

    text = import_denied(text) or text
    if "\n" in text.strip():
        text = _nested(text)
    text = " ".join(text.split())
    if text:
        text += did_you_mean(text, getattr(exc, "valid_keys", None))
    return text or type(exc).__name__


#: Lightning's messages that say nothing about the run (a cloud-logger advertisement, a deprecation inside
#: Lightning itself); every other message and warning is kept
_LIGHTNING_NOISE = ("💡 Tip:", "`isinstance(treespec, LeafSpec)` is deprecated")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_LIGHTNING_NOISE)


def quiet_lightning() -> None:
    """Drop Lightning's advertisement and its own deprecation noise from the command line's output."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # the defences hold frozen classifiers (and anchors) in eval mode on purpose (FrozenModule)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
