"""Progress for long operations: a rich bar on a TTY, JSON lines with --json, silence otherwise."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Counters:
    files_done: int = 0
    bytes_done: int = 0
    total_files: int = 0
    total_bytes: int = 0
    total_known: bool = False
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, files: int = 0, nbytes: int = 0) -> None:
        with self.lock:
            self.files_done += files
            self.bytes_done += nbytes


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 snapshot`, `2 snapshots`: counts read as sentences."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def iec(n: float) -> str:
    """Bytes in IEC units (KiB, MiB, ...), one decimal: the family every figure stasisfs prints uses."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Reporter:
    """Renders `Counters` until stopped. mode: 'bar', 'json' or 'quiet'."""

    def __init__(self, counters: Counters, mode: str, label: str) -> None:
        self.counters = counters
        self.mode = mode
        self.label = label
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    @staticmethod
    def choose(json_output: bool, quiet: bool) -> str:
        if json_output:
            return "json"
        if quiet or not sys.stderr.isatty():
            return "quiet"
        return "bar"

    def __enter__(self) -> Reporter:
        if self.mode != "quiet":
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        if self.mode == "json":
            while not self._stop.wait(1.0):
                self._emit_json()
            return
        # Imported here: runs under cron or with -q never draw a bar, and rich takes a while to load.
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        c = self.counters
        with Progress(
            TextColumn(f"[bold]{self.label}"),
            BarColumn(),
            TextColumn("{task.fields[files]} files"),
            DownloadColumn(binary_units=True),  # IEC units, as every summary line uses
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task(self.label, total=None, files="0", speed="")
            while not self._stop.wait(0.2):
                total = c.total_bytes if c.total_known else None
                elapsed = max(time.monotonic() - self._started, 1e-3)
                bar.update(task, completed=c.bytes_done, total=total, speed=f"{iec(c.bytes_done / elapsed)}/s",
                           files=f"{c.files_done}/{c.total_files}" if c.total_known else str(c.files_done))

    def _emit_json(self) -> None:
        c = self.counters
        doc = {
            "message_type": "status",
            "seconds_elapsed": round(time.monotonic() - self._started, 1),
            "files_done": c.files_done,
            "bytes_done": c.bytes_done,
            "total_files": c.total_files,
            "total_bytes": c.total_bytes,
        }
        if c.total_known and c.total_bytes:
            doc["percent_done"] = round(min(1.0, c.bytes_done / c.total_bytes), 4)
        print(json.dumps(doc), flush=True)
