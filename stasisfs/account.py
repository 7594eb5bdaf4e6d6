"""The user's account on a server: enrolment, login, escrow, recovery of a lost device.

The password never leaves the device. The server gets a login verifier
(Argon2id under the server's salt, then HKDF with its own label) that opens
nothing, and an escrowed key slot that opens only with the password.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import keys as keyslots
from .errors import StasisError, UsageError, WrongKey
from .remote import PerThread, RemoteClient, RemoteError
from .remotes import DeviceRemotes, Remote
from .repository import Repository
from .storage import storage_id, write_atomic
from .sync import config_object


def login(client: RemoteClient, user: str, password: str) -> None:
    """Log in with the password; the client then carries a short-lived session token."""
    salt, kdf = client.login_params(user)
    client.token = client.login(user, keyslots.login_verifier(password, salt, kdf))


def escrow_blob(repo: Repository, remotes: DeviceRemotes, password: str, renew: bool = False) -> bytes:
    """The escrowed key for this repository, made once and kept beside the remotes' settings."""
    blob = None if renew else remotes.escrow()
    if blob is None:
        blob = keyslots.make_escrow(repo.master_keys.master, repo.id, password, config_object(repo)[0])
        remotes.set_escrow(blob)
    return blob


def add_remote(repo: Repository, name: str, url: str, user: str, password: str, enrol_code: str | None,
               cacert: str | None) -> Remote:
    remotes = DeviceRemotes(repo.id)
    if any(r.name == name for r in remotes.all()):
        raise UsageError(f"a remote named {name!r} already exists; remove it first or pick another name")
    client = RemoteClient(url, cacert=cacert, name=name)
    if enrol_code:
        salt, _ = client.login_params(user)
        kdf = keyslots.login_kdf()
        token = client.enrol(user, enrol_code, keyslots.login_verifier(password, salt, kdf), kdf, repo.device)
    else:
        login(client, user, password)
        try:
            token = client.register_device(repo.device)
        except RemoteError as exc:
            if "already exists" in str(exc):
                raise UsageError(f"{user} already has a device named {repo.device!r} on {url}; if this machine replaces it, "
                                 "use `stasisfs recover`, otherwise create the repository with `init --device OTHER-NAME`") from None
            raise
    remote = Remote(name, url, user, repo.device, token, cacert)
    client.token = token
    config_id, config = config_object(repo)
    client.put_object(repo.device, "config", config_id, config)
    client.put_key(repo.device, escrow_blob(repo, remotes, password))
    remotes.add(remote)
    return remote


def change_password_on_remotes(repo: Repository, old_password: str, new_password: str,
                               say: Callable[[str], None]) -> list[str]:
    """Re-escrow under the new password and replace the login verifier on every remote. Returns failures."""
    remotes = DeviceRemotes(repo.id)
    failures = []
    blob = escrow_blob(repo, remotes, new_password, renew=True) if remotes.all() else None
    for remote in remotes.all():
        try:
            client = RemoteClient(remote.url, cacert=remote.cacert, name=remote.name)
            login(client, remote.user, old_password)
            salt, kdf = client.login_params(remote.user)
            client.change_verifier(keyslots.login_verifier(new_password, salt, kdf), kdf)
            client.token = remote.token
            assert blob is not None
            client.put_key(remote.device, blob)
            say(f"remote {remote.name}: escrowed key and login updated")
        except StasisError as exc:
            failures.append(f"{remote.name}: {exc}")
    return failures


def choose_device(devices: list[dict[str, object]], wanted: str | None, user: str) -> str:
    names = [str(d["name"]) for d in devices]
    if wanted is not None:
        if wanted not in names:
            raise UsageError(f"{user} has no device {wanted!r} on this server; it has: {', '.join(names) or 'none'}")
        return wanted
    if len(names) == 1:
        return names[0]
    if not names:
        raise UsageError(f"{user} has no devices on this server yet")
    listing = "\n".join(f"  {d['name']}  (last upload {d.get('last_upload') or 'never'})" for d in devices)
    raise UsageError(f"{user} has several devices; choose one with --device NAME:\n{listing}")


def _config_opened_by(client: RemoteClient, device: str, master: bytes) -> bytes:
    from .crypto import MasterKeys

    for config_id, _ in client.list_objects(device, "config"):
        config = client.get_object(device, "config", config_id)
        doc = json.loads(config)
        if MasterKeys(master, bytes.fromhex(doc["id"])).key_check.hex() == doc.get("key_check"):
            return config
    raise WrongKey(f"this recovery key does not open device {device}")


def fetch_metadata(client: RemoteClient, device: str, repo: Repository) -> int:
    """Fetch the index objects and snapshots the local copy lacks (verified against their ids). Returns how many."""
    have = {kind: set(repo.list_objects(kind)) for kind in ("index", "snapshots")}
    wanted = [(kind, object_id) for kind in ("index", "snapshots") for object_id, _ in client.list_objects(device, kind)
              if object_id not in have[kind]]
    clients = PerThread(lambda: RemoteClient(client.url, client.token, client.cacert, client.name))

    def fetch(item: tuple[str, str]) -> None:
        kind, object_id = item
        data = clients().get_object(device, kind, object_id)
        write_atomic(repo.path / kind / storage_id(data), data, sync=False)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, wanted))
    return len(wanted)


class SessionRemote(Remote):
    """Another device of the user, reached through a password login; logs in again when the session ends."""

    def __init__(self, base: Remote, device: str, verifier: bytes) -> None:
        super().__init__(base.name, base.url, base.user, device, "", base.cacert)
        self._verifier = verifier
        self._lock = threading.Lock()

    def renew(self) -> None:
        with self._lock:
            self.token = RemoteClient(self.url, cacert=self.cacert, name=self.name).login(self.user, self._verifier)

    def client(self) -> RemoteClient:
        if not self.token:
            self.renew()
        return RemoteClient(self.url, self.token, self.cacert, name=self.name)


def open_other_devices(repo: Repository, password: str, say: Callable[[str], None]) -> list[Repository]:
    """The user's other devices on every remote whose escrowed key this password opens, as thin repositories.

    Each lives in this repository's cache (`devices/<remote>/<device>/`), holds only index objects and
    snapshots, and fetches packs from the remote on demand. They are returned closed (no LMDB open),
    so a mount may fork after this.
    """
    from .packcache import RemotePacks

    others = []
    for remote in DeviceRemotes(repo.id).all():
        client = RemoteClient(remote.url, cacert=remote.cacert, name=remote.name)
        salt, kdf = client.login_params(remote.user)
        verifier = keyslots.login_verifier(password, salt, kdf)
        client.token = client.login(remote.user, verifier)
        for device in client.devices():
            name = str(device["name"])
            if name == remote.device:
                continue
            try:
                repo_id, config_id, master = keyslots.open_escrow(client.get_key(name), password)
            except RemoteError:
                continue  # nothing escrowed yet
            except WrongKey:
                say(f"device {name} on {remote.name}: its key does not open with this password; not shown")
                continue
            home = repo.cache_dir / "devices" / remote.name / name
            if (home / "repo" / "config").exists():
                other = Repository(home / "repo", home / "cache")
                other.unlock_master(master)
            else:
                other = Repository.adopt(home / "repo", client.get_object(name, "config", config_id), master, None, home / "cache")
            if other.id != repo_id:
                say(f"device {name} on {remote.name}: its config does not match its escrowed key; not shown")
                other.close()
                continue
            fetch_metadata(client, name, other)
            other.fetch_packs_from(RemotePacks(home / "cache", SessionRemote(remote, name, verifier)))
            other.sync_index()
            other.close()
            others.append(other)
    return others


def recover(url: str, user: str, password: str, device: str | None, target: Path, cacert: str | None,
            remote_name: str, say: Callable[[str], None], recovery_master: bytes | None = None) -> Repository:
    """Make a thin repository at `target` that carries on as the chosen device: keys, index and snapshots, no packs.

    The device key comes from the escrowed copy, or from the recovery key when one is given.
    """
    client = RemoteClient(url, cacert=cacert, name=remote_name)
    login(client, user, password)
    chosen = choose_device(client.devices(), device, user)
    if recovery_master is None:
        repo_id, config_id, master = keyslots.open_escrow(client.get_key(chosen), password)
        config = client.get_object(chosen, "config", config_id)
        if json.loads(config).get("id") != repo_id.hex():
            raise StasisError("the server's repository config does not belong to the escrowed key; refusing it")
    else:
        master, config = recovery_master, _config_opened_by(client, chosen, recovery_master)
    repo = Repository.adopt(target, config, master, password)
    say(f"recovering device {chosen}: repository {repo.id.hex()[:8]} at {repo.path}")
    fetch_metadata(client, chosen, repo)
    token = client.register_device(chosen, resume=True)
    remotes = DeviceRemotes(repo.id)
    for stale in remotes.all():  # a previous recovery into this cache/config
        remotes.remove(stale.name)
    remotes.add(Remote(remote_name, url, user, chosen, token, cacert))
    remotes.set_thin(remote_name)
    remotes.set_escrow(client.get_key(chosen))
    remotes.set_state(remote_name, {"index": repo.list_objects("index"), "snapshots": repo.list_objects("snapshots")})
    repo.rebuild_index(from_packs=False)
    return repo
