"""Run a ``defend`` command in a subprocess (the way Lightning's DDP launcher needs it: it re-executes the command)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["run_defend"]

ROOT = Path(__file__).resolve().parents[1]
PORT_ERRORS = ("EADDRINUSE", "address already in use", "Address already in use")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_defend(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m defend.cli ARGS`` with one thread per process and a fresh rendezvous port; retried once when the
    port was taken between choosing and binding it (nothing else is retried). Asserts success, showing stderr."""
    for attempt in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(_free_port())}
        proc = subprocess.run([sys.executable, "-m", "defend.cli", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode == 0 or attempt == 1 or not any(e in proc.stderr for e in PORT_ERRORS):
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
