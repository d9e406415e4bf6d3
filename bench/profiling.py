"""Where a stage's time goes: py-spy samples of a running process, summarised.

    with Profile(pid, seconds=10) as p: ...   # samples in the background
    print(p.summary())

py-spy (a dev dependency) reads the process's stacks from outside, so the stage runs
unchanged. The summary lists the functions most often on top of the stack ("self": where
the CPU goes) and most often anywhere on it ("total": what a call costs, callees
included), each as a share of the samples, over every thread of the process and its
children (`tally worker` runs its pre-batching stage as a child).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy of this environment (beside its Python), or else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profile:
    """py-spy sampling `pid` (and its children) as a context manager: for `seconds`, or
    (None) until the block ends or the process does.

    `idle`: also count threads waiting (on I/O, locks, the event loop's selector): what
    a latency is made of, not only what the CPU does.
    """

    def __init__(self, pid: int, seconds: float | None = None, *, rate: int = 50,
                 idle: bool = False) -> None:
        self.pid = pid
        self.seconds = seconds
        self.rate = rate
        self.idle = idle
        self.output = Path(tempfile.mkdtemp(prefix="tally-profile-")) / "stacks.txt"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profile:
        command = [py_spy() or "py-spy", "record", "--pid", str(self.pid), "--rate",
                   str(self.rate), "--format", "raw", "--subprocesses", "--nonblocking",
                   "--output", str(self.output)]
        if self.seconds is not None:
            command += ["--duration", str(max(int(self.seconds), 1))]
        if self.idle:
            command.append("--idle")
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            if self.seconds is None:
                self._proc.send_signal(signal.SIGINT)  # py-spy writes what it has, and ends
            try:
                self._proc.wait((self.seconds or 0) + 30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def stacks(self) -> Counter[tuple[str, ...]]:
        """Collapsed stacks (root first) and how many samples each got."""
        counts: Counter[tuple[str, ...]] = Counter()
        if not self.output.exists():
            return counts
        for line in self.output.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if stack and n.isdigit():
                counts[tuple(_short(f) for f in stack.split(";"))] += int(n)
        return counts

    def summary(self, top: int = 12) -> dict[str, object]:
        """Per process (py-spy's root frame names it), its share of the samples and the
        `top` functions by self share of them."""
        stacks = self.stacks()
        total = sum(stacks.values())
        by_process: dict[str, Counter[str]] = {}
        for stack, n in stacks.items():
            # A child's stacks hang under its parent's process frame: the last one names it.
            process = next((f for f in reversed(stack) if f.startswith("process ")), "?")
            by_process.setdefault(process, Counter())[stack[-1] if stack else "?"] += n
        processes = []
        for process, own in sorted(by_process.items(), key=lambda p: -sum(p[1].values())):
            samples = sum(own.values())
            processes.append({
                "process": _process_name(process), "samples": samples,
                "self_percent": [[name, round(100 * n / samples, 1)]
                                 for name, n in own.most_common(top)]})
        return {"samples": total, "rate_hz": self.rate, "idle_included": self.idle,
                "processes": processes}


def _process_name(frame: str) -> str:
    """`process 123:"python -m tally.cli worker --web-port 1"` as `tally.cli worker`."""
    command = frame.split(":", 1)[-1].strip('"')
    words = command.split()
    if "-m" in words:
        words = words[words.index("-m") + 1:]
    return " ".join(w for w in words[:2])


def _short(frame: str) -> str:
    """`function (path/to/module.py:123)` as `function (module.py)`; process and thread
    frames as they are."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib"):
                path = path.split("/", 1)[-1]
            break
    else:
        path = path.rsplit("/", 2)[-2:] and "/".join(path.rsplit("/", 2)[-2:])
    return f"{match.group('function')} ({path})"


def format_summary(name: str, summary: dict[str, object]) -> str:
    """A summary as a few lines of text."""
    lines = [f"### {name}: {summary['samples']} samples at {summary['rate_hz']} Hz"
             + (" (waiting threads included)" if summary["idle_included"] else "")]
    processes = summary["processes"]
    assert isinstance(processes, list)
    for p in processes:
        lines.append(f"{p['process']} ({p['samples']} samples), self share:")
        lines += [f"  {share:5.1f}%  {function}" for function, share in p["self_percent"]]
    return "\n".join(lines)
