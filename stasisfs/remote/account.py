"""The user's account on a server: enrolment, login, the user key, escrow, recovery of a lost device.

Key scheme 2 (docs/format.md, docs/security.md): one Argon2id run of the password
gives the login verifier and the key that wraps a random per-user key; each
device's master key is escrowed wrapped under that user key. So a password change
on any device re-wraps one key, and every device recovers with the new password.
The password never leaves the device; recovery material changes only with a fresh
password login, never with a device token.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from stasisfs.errors import StasisError, UsageError, WrongKey
from stasisfs.format import keyslots
from stasisfs.format.crypto import KEY_LEN
from stasisfs.remote.client import PerThread, RemoteAuthError, RemoteClient, RemoteError
from stasisfs.remote.devices import DeviceRemotes, Remote
from stasisfs.remote.sync import config_object
from stasisfs.repo.repository import Repository, hostname
from stasisfs.repo.storage import storage_id, write_atomic


@dataclass
class Account:
    """A password login: the client holds a fresh session token, and the user key is open."""

    client: RemoteClient
    user: str
    user_key: bytes
    verifier: bytes  # of the current password: the proof a password change sends


@dataclass
class DeviceKey:
    repo_id: bytes
    config_id: str
    master: bytes
    blob: bytes  # the escrowed version that opened
    version: int
    scheme: int
    skipped: list[str] = field(default_factory=list)


def open_account(client: RemoteClient, user: str, password: str, say: Callable[[str], None] = lambda s: None) -> Account:
    """Log in with the password and open the user key; an account still on key scheme 1 is upgraded on the way."""
    salt, kdf, scheme = client.login_params(user)
    if scheme == 1:
        current = keyslots.login_verifier(password, salt, kdf)
        client.token = client.login(user, current)
        return upgrade_account(client, user, password, current, say)
    derived = keyslots.account_secrets(password, salt, kdf)
    client.token = client.login(user, derived.verifier)
    user_key = keyslots.open_user_key(client.user_key(), derived.kek, user)
    return Account(client, user, user_key, derived.verifier)


def set_password(account: Account, new_password: str, changed: bool) -> Account:
    """Wrap the user key under `new_password` (fresh salt) and replace verifier and envelope in one request."""
    salt = os.urandom(16)
    kdf = keyslots.account_kdf()
    derived = keyslots.account_secrets(new_password, salt, kdf)
    envelope = keyslots.wrap_user_key(account.user_key, derived.kek, account.user)
    keyslots.open_user_key(envelope, derived.kek, account.user)  # never send what would not open
    account.client.change_password(account.verifier, salt, kdf, derived.verifier, envelope, changed)
    return Account(account.client, account.user, account.user_key, derived.verifier)


def upgrade_account(client: RemoteClient, user: str, password: str, current_verifier: bytes, say: Callable[[str], None]) -> Account:
    """Scheme 1 -> 2 under the same password: a new user key, and every device's escrow re-wrapped under it.

    Safe to interrupt: the scheme-1 escrows stay until the new envelope is stored and each new escrow confirmed.
    """
    account = Account(client, user, secrets.token_bytes(KEY_LEN), current_verifier)
    rewrapped: list[tuple[str, int]] = []
    for device in client.devices():
        name = str(device["name"])
        try:
            key = device_key(account, name, password)
        except StasisError as exc:  # nothing escrowed, or nothing that opens
            say(f"device {name}: no escrowed key opens with this password ({exc}); it is left as it is")
            continue
        version = client.put_key(name, keyslots.make_device_escrow(key.master, key.repo_id, key.config_id, account.user_key, user, name))
        rewrapped.append((name, version))
    account = set_password(account, password, changed=False)
    for name, version in rewrapped:
        confirm_escrow(account, name, version, password)
    say(f"account {user}: upgraded to key scheme 2 ({len(rewrapped)} escrowed device key{'s' if len(rewrapped) != 1 else ''} re-wrapped)")
    return account


def device_key(account: Account, device: str, password: str) -> DeviceKey:
    """The device's master key from the newest escrowed version that opens; versions that do not are named in `skipped`."""
    skipped: list[str] = []
    for version, blob in account.client.get_keys(device):
        try:
            repo_id, config_id, master = keyslots.open_device_escrow(blob, account.user_key, account.user, device, password)
        except StasisError as exc:  # WrongKey included: junk, damage, or a key of someone else's making
            skipped.append(f"escrowed key version {version} of device {device}: {exc}")
            continue
        scheme = 2 if json.loads(blob).get("version") == 2 else 1
        return DeviceKey(repo_id, config_id, master, blob, version, scheme, skipped)
    detail = f" ({'; '.join(skipped)})" if skipped else ""
    raise WrongKey(f"no escrowed key of device {device} opens with this password{detail}")


def escrow_device(account: Account, repo: Repository, device: str, remotes: DeviceRemotes, password: str) -> None:
    """Escrow this repository's key under the user key, confirm it opens as stored, then drop older versions."""
    blob = keyslots.make_device_escrow(repo.master_keys.master, repo.id, config_object(repo)[0], account.user_key, account.user, device)
    version = account.client.put_key(device, blob)
    confirm_escrow(account, device, version, password)
    remotes.set_escrow(blob)


def confirm_escrow(account: Account, device: str, version: int, password: str) -> None:
    key = device_key(account, device, password)
    if key.version != version:
        raise StasisError(f"the escrowed key just stored for device {device} does not open as stored; older versions are kept")
    account.client.delete_older_keys(device, version)


def enrol(client: RemoteClient, user: str, password: str, code: str, device: str) -> tuple[str, Account]:
    """Enrol `device` with a one-time code: the account's first device creates the user key; a later one
    (a code from the dashboard, say) proves the current password and opens the existing key."""
    salt, params_kdf, _ = client.login_params(user)
    kdf = keyslots.account_kdf()
    derived = keyslots.account_secrets(password, salt, kdf)
    user_key = secrets.token_bytes(KEY_LEN)
    envelope = keyslots.wrap_user_key(user_key, derived.kek, user)
    try:
        token = client.enrol(user, code, derived.verifier, kdf, device, envelope)
    except RemoteError as exc:
        if exc.code != "enrolled":
            raise
        wrong = RemoteAuthError(f"remote {client.name}: {user} already has devices, and this is not the account's password")
        if params_kdf == kdf:
            raise wrong from None
        # The account exists: its verifier was derived with the parameters the server holds.
        derived = keyslots.account_secrets(password, salt, params_kdf)
        try:
            token = client.enrol(user, code, derived.verifier, params_kdf, device, envelope)
        except RemoteError as again:
            raise (wrong if again.code == "enrolled" else again) from None
        return token, open_account(client, user, password)
    client.token = client.login(user, derived.verifier)
    return token, Account(client, user, user_key, derived.verifier)


def add_remote(repo: Repository, name: str, url: str, user: str, password: str, enrol_code: str | None,
               cacert: str | None, say: Callable[[str], None] = lambda s: None) -> Remote:
    remotes = DeviceRemotes(repo.id)
    if any(r.name == name for r in remotes.all()):
        raise UsageError(f"a remote named {name!r} already exists; remove it first or pick another name")
    client = RemoteClient(url, cacert=cacert, name=name)
    if enrol_code:
        token, account = enrol(client, user, password, enrol_code, repo.device)
    else:
        account = open_account(client, user, password, say)
        try:
            token, _ = client.register_device(repo.device)
        except RemoteError as exc:
            if exc.code == "conflict":
                raise UsageError(f"{user} already has a device named {repo.device!r} on {url}; if this machine replaces it, "
                                 "use `stasisfs recover`, otherwise create the repository with `init --device OTHER-NAME`") from None
            raise
    escrow_device(account, repo, repo.device, remotes, password)
    remote = Remote(name, url, user, repo.device, token, cacert)
    device_client = RemoteClient(url, token, cacert, name=name)
    config_id, config = config_object(repo)
    device_client.put_object(repo.device, "config", config_id, config)
    remotes.add(remote)
    remotes.set_state(name, {**remotes.state(name), "password_version": int(client.account().get("password_version", 0))})
    if repo.slot_id:
        remotes.set_account_slot(repo.slot_id)
    return remote


def change_password_on_remotes(repo: Repository, old_password: str, new_password: str,
                               say: Callable[[str], None]) -> list[str]:
    """Re-wrap the user key under the new password on every remote: every device of the user follows. Returns failures."""
    remotes = DeviceRemotes(repo.id)
    failures = []
    for remote in remotes.all():
        try:
            client = RemoteClient(remote.url, cacert=remote.cacert, name=remote.name)
            account = open_account(client, remote.user, old_password, say)
            set_password(account, new_password, changed=True)
            remotes.set_state(remote.name, {**remotes.state(remote.name), "password_version": int(client.account().get("password_version", 0))})
            say(f"remote {remote.name}: password changed for {remote.user}; every device of the account now recovers with it")
        except StasisError as exc:
            failures.append(f"{remote.name}: {exc}")
    return failures


def adopt_password_from_remote(repo: Repository, remote: Remote, password: str, say: Callable[[str], None]) -> str:
    """After a password change on another device: open this repository through the escrow with the account's
    (new) password, and re-wrap the local password slot under it. Returns the new slot's id."""
    remotes = DeviceRemotes(repo.id)
    client = RemoteClient(remote.url, cacert=remote.cacert, name=remote.name)
    account = open_account(client, remote.user, password, say)
    key = device_key(account, remote.device, password)
    for line in key.skipped:
        say(f"skipped {line}")
    if key.repo_id != repo.id:
        raise WrongKey(f"device {remote.device}'s escrowed key on {remote.name} belongs to another repository")
    repo.unlock_master(key.master)
    slot = keyslots.wrap(key.master, repo.id, password.encode(), keyslots.SLOT_PASSWORD, keyslots.argon2_params())
    repo.add_slot(slot)  # the new slot exists before the old one goes
    old = remotes.account_slot()
    if old and old != slot.id and any(s.id == old for s in repo.slots()):
        repo.remove_slot(old)
        say(f"replaced key slot {old} (the old password) with {slot.id}")
    else:
        say(f"added key slot {slot.id}; slots of the old password stay until you remove them (`stasisfs key list`, `key remove ID`)")
    remotes.set_account_slot(slot.id)
    escrow_device(account, repo, remote.device, remotes, password)  # and the server's newest escrow is this device's own again
    remotes.set_state(remote.name, {**remotes.state(remote.name), "password_version": int(client.account().get("password_version", 0))})
    return slot.id


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
    from stasisfs.format.crypto import MasterKeys

    for config_id, _ in client.list_objects(device, "config"):
        config = client.get_object(device, "config", config_id)
        try:
            doc = json.loads(config)
            if MasterKeys(master, bytes.fromhex(doc["id"])).key_check.hex() == doc.get("key_check"):
                return config
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # junk stored as a config: not ours
    raise WrongKey(f"this recovery key does not open device {device}")


def fetch_metadata(client: RemoteClient, device: str, repo: Repository) -> list[str]:
    """Fetch the index objects and snapshots the local copy lacks, keeping only those that authenticate under the key.

    Returns what was skipped, named: junk a token holder uploaded, or damage.
    """
    have = {kind: set(repo.list_objects(kind)) for kind in ("index", "snapshots")}
    wanted = [(kind, object_id) for kind in ("index", "snapshots") for object_id, _ in client.list_objects(device, kind)
              if object_id not in have[kind]]
    clients = PerThread(lambda: RemoteClient(client.url, client.token, client.cacert, client.name))

    def fetch(item: tuple[str, str]) -> str | None:
        kind, object_id = item
        try:
            data = clients().get_object(device, kind, object_id)  # checked against its id
        except StasisError as exc:
            return f"{kind} object {object_id}: {exc}"
        if not repo.authentic(kind, data):
            return f"{kind} object {object_id} does not authenticate under this device's key (junk or tampered)"
        write_atomic(repo.path / kind / storage_id(data), data, sync=False)
        return None

    with ThreadPoolExecutor(8) as pool:
        return [problem for problem in pool.map(fetch, wanted) if problem is not None]


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
    from stasisfs.remote.packcache import RemotePacks

    others = []
    for remote in DeviceRemotes(repo.id).all():
        client = RemoteClient(remote.url, cacert=remote.cacert, name=remote.name)
        account = open_account(client, remote.user, password, say)
        for device in client.devices():
            name = str(device["name"])
            if name == remote.device:
                continue
            try:
                key = device_key(account, name, password)
            except RemoteError as exc:
                if exc.code != "not_found":
                    raise
                continue  # nothing escrowed yet
            except WrongKey:
                say(f"device {name} on {remote.name}: its key does not open with this password; not shown")
                continue
            home = repo.cache_dir / "devices" / remote.name / name
            if (home / "repo" / "config").exists():
                other = Repository(home / "repo", home / "cache")
                other.unlock_master(key.master)
            else:
                other = Repository.adopt(home / "repo", client.get_object(name, "config", key.config_id), key.master, None, home / "cache")
            if other.id != key.repo_id:
                say(f"device {name} on {remote.name}: its config does not match its escrowed key; not shown")
                other.close()
                continue
            for problem in fetch_metadata(client, name, other):
                say(f"device {name} on {remote.name}: skipped {problem}")
            other.fetch_packs_from(RemotePacks(home / "cache", SessionRemote(remote, name, account.verifier)))
            other.sync_index()
            other.close()
            others.append(other)
    return others


@dataclass
class Recovery:
    repo: Repository
    device: str
    taken_over: bool
    skipped: list[str]


def recover(url: str, user: str, password: str, device: str | None, target: Path, cacert: str | None,
            remote_name: str, say: Callable[[str], None], recovery_master: bytes | None = None) -> Recovery:
    """Make a thin repository at `target` that takes over the chosen device: keys, index and snapshots, no packs.

    The device key comes from the newest escrowed version that opens, or from the recovery key when one is
    given. Everything downloaded is authenticated; what is not is named in `skipped` and left out. The server
    retires every earlier copy of the device, so there is one live writer.
    """
    client = RemoteClient(url, cacert=cacert, name=remote_name)
    account = open_account(client, user, password, say)
    chosen = choose_device(client.devices(), device, user)
    skipped: list[str] = []
    key: DeviceKey | None = None
    if recovery_master is None:
        key = device_key(account, chosen, password)
        skipped += key.skipped
        master = key.master
        config = client.get_object(chosen, "config", key.config_id)
        try:
            config_repo = json.loads(config).get("id")
        except (ValueError, AttributeError):
            config_repo = None
        if config_repo != key.repo_id.hex():
            raise StasisError(f"the server's repository config {key.config_id[:16]} does not belong to the escrowed key; refusing it")
    else:
        master, config = recovery_master, _config_opened_by(client, chosen, recovery_master)
    repo = Repository.adopt(target, config, master, password)
    say(f"recovering device {chosen}: repository {repo.id.hex()[:8]} at {repo.path}")
    skipped += fetch_metadata(client, chosen, repo)
    token, taken_over = client.register_device(chosen, take_over=True, host=_host_label())
    remotes = DeviceRemotes(repo.id)
    for stale in remotes.all():  # a previous recovery into this cache/config
        remotes.remove(stale.name)
    remotes.add(Remote(remote_name, url, user, chosen, token, cacert))
    remotes.set_thin(remote_name)
    if key is None or key.skipped or key.scheme == 1:
        escrow_device(account, repo, chosen, remotes, password)  # the newest version on the server is a good one again
    else:
        remotes.set_escrow(key.blob)
    remotes.set_account_slot(repo.slot_id)
    remotes.set_state(remote_name, {"index": repo.list_objects("index"), "snapshots": repo.list_objects("snapshots"),
                                    "password_version": int(client.account().get("password_version", 0))})
    repo.rebuild_index(from_packs=False)
    return Recovery(repo, chosen, taken_over, skipped)


def _host_label() -> str:
    """This machine's name as the retired copy will read it: the characters the server accepts, at most 64."""
    return "".join(c for c in hostname() if c.isascii() and (c.isalnum() or c in "._-"))[:64]
