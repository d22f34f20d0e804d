"""In-process checks run by one long-lived ComfyUI process per ComfyUI folder instead of one process per check.

Why: each check process spends about ten seconds importing torch, ComfyUI and the pack before a check that takes
one to three on the tiny models; the text-encoder checks alone are some twenty per ComfyUI version. The worker
(``inprocess_checks.py serve``) takes one request a line and answers one line; a check that raises is reported and
the worker goes on, one that hangs past its time or kills the process is reported and the next request starts a
fresh worker.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).with_name("inprocess_checks.py")


class InprocessWorker:
    def __init__(self, python: str, comfyui_dir: str) -> None:
        self.python, self.comfyui_dir = python, comfyui_dir
        self.process: subprocess.Popen | None = None
        self.pending = b""  # what the worker printed past the last line read
        self.log = Path(tempfile.mkstemp(prefix="inprocess-worker-", suffix=".log")[1])

    def _start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [self.python, str(SCRIPT), "serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log.open("ab"),
                bufsize=0,
                cwd=self.comfyui_dir,
                env=dict(os.environ, COMFYUI_DIR=self.comfyui_dir),
            )
        return self.process

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> dict:
        process = self._start()
        process.stdin.write((json.dumps({"argv": argv, "env": env}) + "\n").encode())
        process.stdin.flush()
        printed: list[str] = []
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self.pending:
                    raw, self.pending = self.pending.split(b"\n", 1)
                    line = raw.decode(errors="replace")
                    if line.startswith("RESULT "):
                        return json.loads(line[len("RESULT ") :])
                    if line.startswith("FAILED "):
                        raise AssertionError(f"{argv} failed:\n{json.loads(line[len('FAILED ') :])}")
                    printed.append(line + "\n")
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.stop()
                    raise AssertionError(f"{argv}: no answer in {timeout:.0f} s\n{self._tail(printed)}")
                chunk = os.read(process.stdout.fileno(), 1 << 16)
                if not chunk:
                    self.stop()
                    raise AssertionError(f"{argv}: the worker died\n{self._tail(printed)}")
                self.pending += chunk

    def _tail(self, printed: list[str]) -> str:
        return "".join(printed)[-3000:] + self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process, self.pending = None, b""


_WORKERS: dict[tuple[str, str], InprocessWorker] = {}


def worker_for(python: str, comfyui_dir: str) -> InprocessWorker:
    key = (python, comfyui_dir)
    if key not in _WORKERS:
        _WORKERS[key] = InprocessWorker(python, comfyui_dir)
    return _WORKERS[key]


@atexit.register
def _stop_all() -> None:
    for worker in _WORKERS.values():
        worker.stop()
