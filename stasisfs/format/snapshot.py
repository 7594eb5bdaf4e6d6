"""The snapshot record. Pure: no I/O.

A snapshot is a small sealed JSON object; its id is the SHA-256 of the sealed
bytes, the same id a server stores it under.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime


@dataclass
class Summary:
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs_new: int = 0
    data_added: int = 0
    total_files: int = 0
    total_bytes: int = 0
    duration_s: float = 0.0


@dataclass
class Snapshot:
    time: datetime
    device: str
    paths: list[bytes]
    root: bytes
    tags: list[str] = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)
    incomplete: list[str] = field(default_factory=list)
    id: bytes = b""

    @property
    def short_id(self) -> str:
        return self.id.hex()[:8]

    def encode(self) -> bytes:
        doc = {
            "version": 1,
            "time": self.time.isoformat(),
            "device": self.device,
            "paths": [os.fsdecode(p) for p in self.paths],
            "root": self.root.hex(),
            "tags": self.tags,
            "summary": asdict(self.summary),
            "incomplete": self.incomplete,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def decode(cls, data: bytes, snapshot_id: bytes) -> Snapshot:
        doc = json.loads(data)
        return cls(
            time=datetime.fromisoformat(doc["time"]),
            device=doc["device"],
            paths=[os.fsencode(p) for p in doc["paths"]],
            root=bytes.fromhex(doc["root"]),
            tags=list(doc.get("tags", [])),
            summary=Summary(**doc.get("summary", {})),
            incomplete=list(doc.get("incomplete", [])),
            id=snapshot_id,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id.hex(),
            "short_id": self.short_id,
            "time": self.time.isoformat(),
            "device": self.device,
            "paths": [os.fsdecode(p) for p in self.paths],
            "tags": self.tags,
            "summary": asdict(self.summary),
        }


@dataclass(frozen=True)
class SnapshotFilter:
    """`--path` and `--tag`: a snapshot passes when it holds every path given and carries every tag given."""

    paths: tuple[bytes, ...] = ()
    tags: tuple[str, ...] = ()

    def admits(self, snapshot: Snapshot) -> bool:
        return all(holds(snapshot, p) for p in self.paths) and all(t in snapshot.tags for t in self.tags)

    def describe(self) -> str:
        parts = [f"--path {os.fsdecode(p)}" for p in self.paths] + [f"--tag {t}" for t in self.tags]
        return " ".join(parts)


def holds(snapshot: Snapshot, path: bytes) -> bool:
    """Whether `path` is one of the snapshot's backed-up paths or lies under one."""
    path = path.rstrip(b"/") or b"/"
    return any(path == p or path.startswith(p.rstrip(b"/") + b"/") for p in snapshot.paths)


def resolve(snapshots: list[Snapshot], ref: str, path: bytes = b"", only: SnapshotFilter | None = None) -> Snapshot:
    """`latest`, a full id or a unique prefix. Raises LookupError with a user-facing message.

    `latest` is the newest snapshot that passes `only` and, when `path` is given (`latest:PATH`), holds it.
    """
    if not snapshots:
        raise LookupError("the repository has no snapshots yet")
    ordered = sorted(snapshots, key=lambda s: s.time)
    if ref == "latest":
        chosen = [s for s in ordered if (only is None or only.admits(s)) and (not path or holds(s, path))]
        if not chosen:
            what = " ".join(w for w in (f"holding {os.fsdecode(path)}" if path else "", only.describe() if only else "") if w)
            raise LookupError(f"no snapshot {what}; `stasisfs snapshots` lists their paths and tags")
        return chosen[-1]
    matches = [s for s in snapshots if s.id.hex().startswith(ref.lower())]
    if len(matches) == 1 and ref:
        return matches[0]
    if not matches:
        raise LookupError(f"no snapshot matches {ref!r}")
    raise LookupError(f"snapshot prefix {ref!r} is ambiguous; give more characters")
