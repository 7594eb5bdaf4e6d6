"""`Service`, the server's rules, in process: no HTTP, an in-memory object store and a real SQLite file."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest

from stasisfs_server import service as rules
from stasisfs_server.db import connect
from stasisfs_server.service import Principal, Refused, Service
from stasisfs_server.stores.memory import MemoryStore

KDF = {"name": "argon2id", "iterations": 1, "memory_kib": 64, "lanes": 1}
VERIFIER = hashlib.sha256(b"the right password").digest()
ENVELOPE = b"e" * 60


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(connect(f"sqlite:///{tmp_path / 'stasis.db'}"), MemoryStore())


def enrolled(service: Service, quota: int | None = None) -> tuple[str, Principal]:
    code = service.add_user("alice", quota=quota)
    token, _ = service.enrol("alice", code, VERIFIER, KDF, "laptop", ENVELOPE)
    return token, service.authenticate(token)


def refused(code: str, call: object, *args: object) -> Refused:
    with pytest.raises(Refused) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code == code, caught.value.detail
    return caught.value


def test_a_device_token_never_writes_recovery_material(service: Service) -> None:
    _, device = enrolled(service)
    laptop = service.device(device, "laptop", write=True)
    refused("forbidden", service.put_escrow, device, laptop, b"junk")
    refused("forbidden", service.user_key, device)
    refused("forbidden", service.change_password, device, VERIFIER, b"s" * 16, KDF, b"v" * 32, ENVELOPE, True, "127.0.0.1")


def test_a_password_change_needs_a_fresh_login_and_the_current_password(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    enrolled(service)
    session = service.authenticate(service.login("alice", VERIFIER, "127.0.0.1"))
    refused("wrong_password", service.change_password, session, b"x" * 32, b"s" * 16, KDF, b"n" * 32, ENVELOPE, True, "127.0.0.1")
    monkeypatch.setattr(rules, "FRESH_LOGIN", timedelta(seconds=-1))  # the same session, now too old
    refused("reauth_required", service.change_password, session, VERIFIER, b"s" * 16, KDF, b"n" * 32, ENVELOPE, True, "127.0.0.1")
    monkeypatch.undo()
    service.change_password(session, VERIFIER, b"s" * 16, KDF, b"n" * 32, ENVELOPE, True, "127.0.0.1")
    assert service.account(session)["password_version"] == 1
    refused("unauthorized", service.login, "alice", VERIFIER, "127.0.0.1")
    assert service.login("alice", b"n" * 32, "127.0.0.1")


def test_a_takeover_retires_every_older_token_of_the_device(service: Service) -> None:
    old, _ = enrolled(service)
    session = service.authenticate(service.login("alice", VERIFIER, "10.0.0.9"))
    new, _, taken_over = service.register_device(session, "laptop", take_over=True, by="10.0.0.9 (host newbox)")
    assert taken_over
    retired = refused("device_retired", service.authenticate, old)
    assert "newbox" in retired.detail
    assert service.authenticate(new).device_id is not None


def test_quota_counts_objects_escrow_and_envelope_and_frees_on_delete(service: Service) -> None:
    _, device = enrolled(service, quota=len(ENVELOPE) + 1500)
    laptop = service.device(device, "laptop", write=True)
    data = b"d" * 1000
    assert service.put_object(laptop, "data", hashlib.sha256(data).hexdigest(), data)
    assert service.account(device)["used"] == len(ENVELOPE) + 1000
    more = b"m" * 600
    refused("quota", service.put_object, laptop, "data", hashlib.sha256(more).hexdigest(), more)
    service.delete_object(device, laptop, "data", hashlib.sha256(data).hexdigest())
    assert service.account(device)["used"] == len(ENVELOPE)
    refused("not_found", service.delete_object, device, laptop, "data", hashlib.sha256(data).hexdigest())


def test_guessing_from_one_address_leaves_another_free(service: Service) -> None:
    enrolled(service)
    for _ in range(5):
        refused("unauthorized", service.login, "alice", b"w" * 32, "198.51.100.7")
    refused("rate_limited", service.login, "alice", VERIFIER, "198.51.100.7")
    assert service.login("alice", VERIFIER, "203.0.113.5")


def test_names_and_ids_are_full_matches(service: Service) -> None:
    refused("malformed", rules.check_name, "alice\n", "user")
    refused("malformed", rules.check_object, "data", "a" * 64 + "\n")
