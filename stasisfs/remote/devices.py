"""This device's remotes for one repository: where they are, its token on each, and what each last served.

Kept under `$XDG_CONFIG_HOME/stasisfs/repositories/<repository id>/`, never in
the repository directory (which may travel on a USB disk), in 0600 files:

    remotes.json   {"remotes": [{name, url, user, device, token, cacert}], "thin": NAME|null, "account_slot": slot id|null}
    state.json     {NAME: {"snapshots": [ids confirmed on it], "index": [...], "password_version": n, "last_sync": ISO,
                           "delete": {kind: [ids this device deleted, for the remote to delete]}}}
    escrow.key     the escrowed wrapped key as uploaded (it opens only with the user key), to compare with the remote's

`account_slot` is the local password slot that opens with the account password, so that a
password changed on another device can replace it (`key passwd --from-remote`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from stasisfs.errors import UsageError
from stasisfs.repo.storage import read_json_file, write_atomic, write_json_file
from stasisfs.system.paths import config_root

if TYPE_CHECKING:
    from stasisfs.remote.client import RemoteClient




@dataclass
class Remote:
    name: str
    url: str
    user: str
    device: str
    token: str
    cacert: str | None = None

    def client(self) -> RemoteClient:
        from stasisfs.remote.client import RemoteClient  # requests is only loaded when a remote is used

        return RemoteClient(self.url, self.token, self.cacert, name=self.name)


class DeviceRemotes:
    def __init__(self, repo_id: bytes) -> None:
        self.dir = config_root() / "repositories" / repo_id.hex()
        self._doc = self._read("remotes.json", {"remotes": [], "thin": None})

    def _read(self, name: str, default: dict[str, Any]) -> dict[str, Any]:
        return read_json_file(self.dir / name, default)

    def save(self) -> None:
        write_json_file(self.dir / "remotes.json", self._doc)

    # --- remotes ---
    def all(self) -> list[Remote]:
        return [Remote(**r) for r in self._doc["remotes"]]

    def get(self, name: str) -> Remote:
        for remote in self.all():
            if remote.name == name:
                return remote
        raise UsageError(f"no remote named {name!r}; see `stasisfs remote list`")

    def select(self, names: tuple[str, ...] | list[str]) -> list[Remote]:
        return [self.get(n) for n in names] if names else self.all()

    def add(self, remote: Remote) -> None:
        if any(r["name"] == remote.name for r in self._doc["remotes"]):
            raise UsageError(f"a remote named {remote.name!r} already exists")
        self._doc["remotes"].append(asdict(remote))
        self.save()

    def remove(self, name: str) -> None:
        self.get(name)
        self._doc["remotes"] = [r for r in self._doc["remotes"] if r["name"] != name]
        if self._doc.get("thin") == name:
            self._doc["thin"] = None
        self.save()

    def update_token(self, name: str, token: str) -> None:
        for r in self._doc["remotes"]:
            if r["name"] == name:
                r["token"] = token
        self.save()

    # --- thin repositories: packs stay on this remote and are fetched on demand ---
    @property
    def thin(self) -> Remote | None:
        name = self._doc.get("thin")
        return self.get(name) if name else None

    def set_thin(self, name: str | None) -> None:
        self._doc["thin"] = name
        self.save()

    # --- what each remote last served, for rollback detection ---
    def state(self, name: str) -> dict[str, Any]:
        return dict(self._read("state.json", {}).get(name, {}))

    def set_state(self, name: str, state: dict[str, Any]) -> None:
        doc = self._read("state.json", {})
        doc[name] = state
        write_json_file(self.dir / "state.json", doc)

    # --- deletions this device made, for every remote to apply at its next sync ---
    def add_tombstones(self, kind: str, ids: list[str]) -> None:
        if not ids:
            return
        doc = self._read("state.json", {})
        for remote in self.all():
            state = doc.setdefault(remote.name, {})
            pending = state.setdefault("delete", {}).setdefault(kind, [])
            pending.extend(i for i in ids if i not in pending)
        write_json_file(self.dir / "state.json", doc)

    # --- the local slot of the account password ---
    def account_slot(self) -> str | None:
        slot = self._doc.get("account_slot")
        return str(slot) if slot else None

    def set_account_slot(self, slot_id: str | None) -> None:
        self._doc["account_slot"] = slot_id or None
        self.save()

    # --- the escrowed key ---
    def escrow(self) -> bytes | None:
        try:
            return (self.dir / "escrow.key").read_bytes()
        except FileNotFoundError:
            return None

    def set_escrow(self, blob: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.dir / "escrow.key", blob, mode=0o600)
