"""One `copylora copy-machine` run as a child process: its output read as it comes, its progress
parsed from it, and Stop ending the whole process tree (copy-machine, accelerate, kohya).

The run is the command itself, so the page does what the terminal would, reuse on a rerun included.
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

LOG_LINES = 12
# what copy-machine prints as it starts each step -> the step (a key of i18n.TEXTS)
STEPS = (
    ("LoRA A: training", "step_train_a"),
    ("LoRA A: reusing", "step_reuse_a"),
    ("baking A into the base", "step_bake"),
    ("merged checkpoint: reusing", "step_reuse_bake"),
    ("LoRA B: training", "step_train_b"),
    ("LoRA B: reusing", "step_reuse_b"),
    ("merging B - A", "step_merge"),
    ("preview of", "step_preview"),
)
TRAINING_STEPS = ("step_train_a", "step_train_b")  # where a progress bar is kohya's step counter
# kohya's tqdm bar: "steps:  37%|███▋      | 1480/4000 [12:34<21:23, 1.96it/s, avr_loss=0.0812]"
KOHYA_COUNTER = re.compile(r"\|\s*(\d+)/(\d+)\s*\[([\d:]+)<([\d:?]+)")
STOP_GRACE_SECONDS = 10


@dataclass
class Progress:
    """What the run's output has said so far."""

    step: str = ""  # a key of i18n.TEXTS; "" before the first step
    counter: tuple[int, int] | None = None  # kohya's own step counter (done, total)
    remaining: str = ""  # kohya's estimate for the current training
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    report: Path | None = None
    fidelity: str = ""
    errors: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        line = line.rstrip()
        if not line:
            return
        match = KOHYA_COUNTER.search(line) if self.step in TRAINING_STEPS else None
        if match:
            self.counter = int(match[1]), int(match[2])
            self.remaining = match[4]
            if self.lines and KOHYA_COUNTER.search(self.lines[-1]):
                self.lines.pop()  # one bar line, updated in place as in a terminal
        self.lines.append(line)
        for marker, step in STEPS:
            if marker in line:
                self.step, self.counter, self.remaining = step, None, ""
        if "copy_machine: report: " in line or "copy-machine: report: " in line:
            self.report = Path(line.split(" report: ", 1)[1])
        if "; fidelity vs exact delta: " in line:
            self.fidelity = "fidelity vs exact delta: " + line.split("; fidelity vs exact delta: ", 1)[1]
        if ": error: " in line:
            self.errors.append(line)


class CopyMachineProcess:
    """`python -m copylora.copy_machine ARGV` in its own process group, read by a thread."""

    def __init__(self, argv: list[str]):
        self.started = time.monotonic()
        self.stopped = False
        self._chunks: queue.Queue[str] = queue.Queue()
        self._pending = ""
        group = (dict(creationflags=subprocess.CREATE_NEW_PROCESS_GROUP) if sys.platform == "win32"
                 else dict(start_new_session=True))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "copylora.copy_machine", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **group,
        )
        threading.Thread(target=self._read, daemon=True).start()
        # its own process group does not get the terminal's Ctrl-C: end it with the GUI, not after it
        atexit.register(self.stop)

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := self.process.stdout.read1(65536):  # type: ignore[attr-defined]
            self._chunks.put(chunk.decode("utf-8", errors="replace"))
        self._chunks.put("")  # end of output

    def lines(self, wait: float) -> tuple[list[str], bool]:
        """The complete lines (a progress bar's \\r counts as a line end) that came within `wait` seconds,
        and whether the output has ended."""
        text, ended = self._pending, False
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                chunk = self._chunks.get(timeout=left)
            except queue.Empty:
                break
            if chunk == "":
                ended = True
                break
            text += chunk
        lines = re.split(r"\r\n|\r|\n", text)
        self._pending = "" if ended else lines.pop()  # a line still being written
        return lines, ended

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self) -> int:
        return self.process.wait()

    def stop(self) -> None:
        """End the whole tree: copy-machine, accelerate and every kohya process under them."""
        if self.process.poll() is not None:
            return
        self.stopped = True
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True)
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL: whatever ignored SIGTERM or outlived its parent
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return  # the whole group is gone
            if sig == signal.SIGTERM:
                try:
                    self.process.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
