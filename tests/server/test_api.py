"""The HTTP API of a real stasisfs-server on loopback: who may do what, and how hostile requests are answered."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from server_fixture import TEST_ENVELOPE, TEST_KDF, Server, auth, enrol, enrol_concurrently, from_address, login, obj

pytestmark = pytest.mark.timeout(120)


def test_health_and_openapi(server: Server) -> None:
    assert requests.get(f"{server.url}/v1/health", timeout=10).json() == {"status": "ok"}
    spec = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert "/v1/devices/{device}/objects/{kind}/{object_id}" in spec["paths"]
    assert "/v1/enrol" in spec["paths"]


def test_user_names_cannot_be_probed(server: Server) -> None:
    server.add_user("alice")
    known = requests.get(f"{server.url}/v1/users/alice/params", timeout=10).json()
    unknown = requests.get(f"{server.url}/v1/users/mallory/params", timeout=10).json()
    assert known.keys() == unknown.keys() and known["kdf"] == unknown["kdf"]
    assert len(bytes.fromhex(unknown["salt"])) == len(bytes.fromhex(known["salt"]))
    assert requests.get(f"{server.url}/v1/users/mallory/params", timeout=10).json() == unknown  # stable, like a real salt
    enrol(server, "bob")
    assert login(server, "mallory").status_code == login(server, "alice").status_code == 401  # unknown vs not enrolled


def test_enrolment_code_works_once(server: Server) -> None:
    code = server.add_user("alice")
    enrol(server, "alice", code=code)
    body: dict[str, Any] = {"user": "alice", "code": code, "verifier": "00" * 32, "kdf": TEST_KDF, "device": "other", "envelope": TEST_ENVELOPE}
    again = requests.post(f"{server.url}/v1/enrol", json=body, timeout=10)
    assert again.status_code == 401 and again.json()["code"] == "unauthorized"
    wrong = requests.post(f"{server.url}/v1/enrol", json={**body, "code": "nope"}, timeout=10)
    assert wrong.status_code == 401


def test_concurrent_enrolment_with_one_code_succeeds_once(server: Server) -> None:
    code = server.add_user("alice")
    assert sorted(enrol_concurrently(server.url, "alice", code, 8)) == [200] + [401] * 7


def test_objects_round_trip_with_ranges_listing_and_missing(server: Server) -> None:
    token = enrol(server, "alice")
    blobs = [os.urandom(1000 + n) for n in range(7)]
    for blob in blobs:
        assert requests.put(obj(server, "laptop", blob), data=blob, headers=auth(token), timeout=10).status_code == 201
    first = blobs[0]
    url = obj(server, "laptop", first)
    assert requests.get(url, headers=auth(token), timeout=10).content == first
    part = requests.get(url, headers={**auth(token), "Range": "bytes=10-19"}, timeout=10)
    assert part.status_code == 206 and part.content == first[10:20] and part.headers["Content-Range"] == f"bytes 10-19/{len(first)}"
    assert requests.get(url, headers={**auth(token), "Range": "bytes=-5"}, timeout=10).content == first[-5:]
    assert requests.get(url, headers={**auth(token), "Range": "bytes=999999-"}, timeout=10).status_code == 416
    assert int(requests.head(url, headers=auth(token), timeout=10).headers["Content-Length"]) == len(first)
    ids = sorted(hashlib.sha256(b).hexdigest() for b in blobs)
    listed, after = [], ""
    while True:
        page = requests.get(f"{server.url}/v1/devices/laptop/objects/data/", params={"after": after, "limit": "3"}, headers=auth(token), timeout=10).json()
        listed += [o["id"] for o in page["objects"]]
        if not page["next"]:
            break
        after = page["next"]
    assert listed == ids
    absent = "ab" * 32
    missing = requests.post(f"{server.url}/v1/devices/laptop/objects/data/missing", json={"ids": [ids[0], absent]}, headers=auth(token), timeout=10)
    assert missing.json() == {"missing": [absent]}


def test_strangers_are_refused(server: Server) -> None:
    alice = enrol(server, "alice")
    bob = enrol(server, "bob", device="phone")
    blob = b"alice's pack"
    url = obj(server, "laptop", blob)
    assert requests.put(url, data=blob, headers=auth(alice), timeout=10).status_code == 201
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers=auth("not-a-token"), timeout=10).status_code == 401
    assert requests.get(url, headers=auth(bob), timeout=10).status_code == 404  # another user's device is invisible
    assert requests.put(url, data=blob, headers=auth(bob), timeout=10).status_code == 404
    assert requests.get(f"{server.url}/v1/devices/laptop/key", headers=auth(bob), timeout=10).status_code == 404
    assert requests.delete(f"{server.url}/v1/devices/laptop", headers=auth(bob), timeout=10).status_code in (403, 404)


@pytest.mark.parametrize("path", ["/v1/devices/laptop/objects/data/..%2F..%2F..%2Fetc%2Fpasswd",
                                  "/v1/devices/laptop/objects/..%2Fdata/" + "0" * 64,
                                  "/v1/devices/..%2F..%2Fx/objects/data/" + "0" * 64,
                                  "/v1/devices/laptop/objects/data/" + "0" * 63,
                                  "/v1/devices/laptop/objects/data/" + "A" * 64,
                                  "/v1/devices/laptop/objects/keys/" + "0" * 64])
def test_path_traversal_and_malformed_ids(server: Server, path: str) -> None:
    token = enrol(server, "alice")
    answer = requests.get(server.url + path, headers=auth(token), timeout=10)
    assert 400 <= answer.status_code < 500
    assert b"root:" not in answer.content


def test_bad_hash_and_no_overwrite_of_a_good_object(server: Server) -> None:
    token = enrol(server, "alice")
    good = b"good object"
    url = obj(server, "laptop", good)
    assert requests.put(url, data=b"other bytes", headers=auth(token), timeout=10).status_code == 400
    assert requests.put(url, data=good, headers=auth(token), timeout=10).status_code == 201
    assert requests.put(url, data=b"evil bytes", headers=auth(token), timeout=10).status_code == 400
    again = requests.put(url, data=good, headers=auth(token), timeout=10)
    assert again.status_code == 200 and again.json() == {"stored": False}
    assert requests.get(url, headers=auth(token), timeout=10).content == good


def test_damaged_copy_is_healed_by_a_put(server: Server) -> None:
    token = enrol(server, "alice")
    good = os.urandom(5000)
    url = obj(server, "laptop", good)
    requests.put(url, data=good, headers=auth(token), timeout=10)
    [stored] = [p for p in (server.data / "objects").rglob("*") if p.is_file()]
    stored.write_bytes(b"bit rot")
    healed = requests.put(url, data=good, headers=auth(token), timeout=10)
    assert healed.status_code == 201
    assert stored.read_bytes() == good


def test_body_limits(server: Server) -> None:
    token = enrol(server, "alice")
    huge_json = b'{"ids": ["' + b"0" * 400_000 + b'"]}'
    answer = requests.post(f"{server.url}/v1/devices/laptop/objects/data/missing", data=huge_json,
                           headers={**auth(token), "Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 413


def test_body_limit_without_declared_length(tmp_path: Path) -> None:
    srv = Server(tmp_path / "srv")
    srv.start()
    try:
        token = enrol(srv, "alice")

        def chunks() -> Iterator[bytes]:
            for _ in range(200):
                yield b"x" * 4096

        answer = requests.put(f"{srv.url}/v1/devices/laptop/key", data=chunks(), headers=auth(token), timeout=30)
        assert answer.status_code == 413
    finally:
        srv.stop()


def test_quota_is_enforced_with_507(server: Server) -> None:
    token = enrol(server, "alice", "laptop", None, "--quota", "10000")
    assert requests.put(obj(server, "laptop", b"a" * 6000), data=b"a" * 6000, headers=auth(token), timeout=10).status_code == 201
    over = requests.put(obj(server, "laptop", b"b" * 6000), data=b"b" * 6000, headers=auth(token), timeout=10)
    assert over.status_code == 507 and over.json()["code"] == "quota"


def test_guessing_is_slowed_per_address_and_never_locks_the_owner_out(server: Server) -> None:
    enrol(server, "alice")
    attacker = from_address("127.0.0.2")
    url = f"{server.url}/v1/users/alice/login"
    statuses = [attacker.post(url, json={"verifier": "00" * 32}, timeout=10) for _ in range(7)]
    assert [r.status_code for r in statuses[:5]] == [401] * 5
    slowed = statuses[5]
    assert slowed.status_code == 429 and slowed.json()["code"] == "rate_limited" and int(slowed.headers["Retry-After"]) >= 1
    # The owner, from another address, logs in at once while the attacker is held back.
    assert from_address("127.0.0.3").post(url, json={"verifier": hashlib.sha256(b"alice").hexdigest()}, timeout=10).status_code == 200
    # And from the usual address, which has not failed either.
    assert login(server, "alice").status_code == 200


def test_the_delay_grows_and_then_lets_the_next_guess_through(server: Server) -> None:
    enrol(server, "alice")
    attacker = from_address("127.0.0.4")
    url = f"{server.url}/v1/users/alice/login"
    for _ in range(5):
        assert attacker.post(url, json={"verifier": "00" * 32}, timeout=10).status_code == 401
    assert attacker.post(url, json={"verifier": "00" * 32}, timeout=10).status_code == 429
    time.sleep(2.2)  # five free failures, then 1 s after the fifth, 2 s after a sixth: a delay, not a lock
    assert attacker.post(url, json={"verifier": hashlib.sha256(b"alice").hexdigest()}, timeout=10).status_code == 200


def test_sessions_register_and_revoke_devices(server: Server) -> None:
    device_token = enrol(server, "alice")
    session = login(server, "alice").json()["token"]
    phone = requests.post(f"{server.url}/v1/devices", json={"name": "phone"}, headers=auth(session), timeout=10).json()["token"]
    assert requests.post(f"{server.url}/v1/devices", json={"name": "phone"}, headers=auth(session), timeout=10).status_code == 409
    assert requests.post(f"{server.url}/v1/devices", json={"name": "x"}, headers=auth(device_token), timeout=10).status_code == 403
    names = [d["name"] for d in requests.get(f"{server.url}/v1/devices", headers=auth(phone), timeout=10).json()]
    assert names == ["laptop", "phone"]
    # a device token reaches only its own device
    assert requests.get(f"{server.url}/v1/devices/laptop/objects/data/", headers=auth(phone), timeout=10).status_code == 404
    assert requests.delete(f"{server.url}/v1/devices/laptop", headers=auth(session), timeout=10).status_code == 200
    assert requests.get(f"{server.url}/v1/devices", headers=auth(device_token), timeout=10).status_code == 401
    # the revoked device's data stays reachable with the password, for recovery
    assert requests.get(f"{server.url}/v1/devices/laptop/objects/data/", headers=auth(session), timeout=10).status_code == 200


def test_a_device_token_cannot_touch_recovery_material(server: Server) -> None:
    token = enrol(server, "alice")
    url = f"{server.url}/v1/devices/laptop/key"
    refused = requests.put(url, data=b"junk from a thief", headers=auth(token), timeout=10)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    assert requests.get(f"{server.url}/v1/account/key", headers=auth(token), timeout=10).json()["code"] == "forbidden"
    change: dict[str, Any] = {"current": hashlib.sha256(b"alice").hexdigest(), "salt": "11" * 16, "kdf": TEST_KDF, "verifier": "33" * 32,
              "envelope": TEST_ENVELOPE}
    assert requests.put(f"{server.url}/v1/account/password", json=change, headers=auth(token), timeout=10).status_code == 403
    # A session token changes the password only with the current password's verifier as well.
    session = login(server, "alice").json()["token"]
    wrong = requests.put(f"{server.url}/v1/account/password", json={**change, "current": "44" * 32}, headers=auth(session), timeout=10)
    assert wrong.status_code == 403 and wrong.json()["code"] == "wrong_password"
    assert login(server, "alice").status_code == 200  # the old password still logs in: nothing changed


def test_escrow_versions_are_bounded_counted_and_pruned_once_confirmed(server: Server) -> None:
    enrol(server, "alice", "laptop", None, "--quota", "100000")
    session = login(server, "alice").json()["token"]
    url = f"{server.url}/v1/devices/laptop/key"
    versions = [requests.put(url, data=b"w" * 1000 + bytes([n]), headers=auth(session), timeout=10).json()["version"] for n in range(6)]
    assert versions == [1, 2, 3, 4, 5, 6]
    kept = requests.get(f"{server.url}/v1/devices/laptop/keys", headers=auth(session), timeout=10).json()["keys"]
    assert [k["version"] for k in kept] == [6, 5, 4, 3]
    account = requests.get(f"{server.url}/v1/account", headers=auth(session), timeout=10).json()
    assert account["used"] == 4 * 1001 + len(base64.b64decode(TEST_ENVELOPE))
    assert requests.delete(f"{server.url}/v1/devices/laptop/keys", params={"older_than": 6}, headers=auth(session), timeout=10).json() == {"deleted": 3}
    assert requests.get(f"{server.url}/v1/account", headers=auth(session), timeout=10).json()["used"] == 1001 + len(base64.b64decode(TEST_ENVELOPE))
    newest = requests.get(url, headers=auth(session), timeout=10)
    assert newest.content == b"w" * 1000 + bytes([5]) and newest.headers["X-Key-Version"] == "6"
    # The escrow counts against the quota like any object.
    big = requests.put(url, data=b"x" * 60000, headers=auth(session), timeout=10)
    assert big.status_code == 201 or big.status_code == 200
    assert requests.put(url, data=b"y" * 60000, headers=auth(session), timeout=10).json()["code"] == "quota"


def test_a_takeover_retires_the_old_copy_with_a_clear_refusal(server: Server) -> None:
    old = enrol(server, "alice")
    session = login(server, "alice").json()["token"]
    taken = requests.post(f"{server.url}/v1/devices", json={"name": "laptop", "take_over": True, "host": "newbox"}, headers=auth(session), timeout=10)
    assert taken.status_code == 200 and taken.json()["taken_over"] is True
    new = taken.json()["token"]
    refused = requests.put(obj(server, "laptop", b"from the old copy"), data=b"from the old copy", headers=auth(old), timeout=10)
    assert refused.status_code == 409 and refused.json()["code"] == "device_retired"
    assert "taken over" in refused.json()["detail"] and "newbox" in refused.json()["detail"]
    assert requests.get(f"{server.url}/v1/devices/laptop/objects/data/", headers=auth(old), timeout=10).json()["code"] == "device_retired"
    assert requests.put(obj(server, "laptop", b"new"), data=b"new", headers=auth(new), timeout=10).status_code == 201
    # Without take_over an existing name is a conflict, never a silent second writer.
    assert requests.post(f"{server.url}/v1/devices", json={"name": "laptop"}, headers=auth(session), timeout=10).json()["code"] == "conflict"


def test_append_only_refuses_deletes(server: Server) -> None:
    token = enrol(server, "alice", "laptop", None, "--append-only")
    url = obj(server, "laptop", b"keep me")
    requests.put(url, data=b"keep me", headers=auth(token), timeout=10)
    assert requests.delete(url, headers=auth(token), timeout=10).status_code == 403
    assert requests.get(url, headers=auth(token), timeout=10).content == b"keep me"
    assert server.admin("user", "set", "alice", "--no-append-only").returncode == 0
    assert requests.delete(url, headers=auth(token), timeout=10).status_code == 200
    assert requests.get(url, headers=auth(token), timeout=10).status_code == 404


def test_admin_commands_while_serving(server: Server) -> None:
    token = enrol(server, "alice")
    requests.put(obj(server, "laptop", b"abc"), data=b"abc", headers=auth(token), timeout=10)
    listing = server.admin("user", "list", "--json")
    assert '"objects_bytes": 3' in listing.stdout
    devices = server.admin("device", "list", "alice")
    assert "laptop" in devices.stdout
    assert server.admin("device", "revoke", "alice", "laptop").returncode == 0
    assert requests.get(f"{server.url}/v1/devices", headers=auth(token), timeout=10).status_code == 401
    reissued = server.admin("user", "reissue", "alice").stdout.strip().splitlines()[-1]
    assert len(reissued) > 10
    assert server.admin("user", "disable", "alice").returncode == 0
    assert login(server, "alice").status_code == 401
    assert server.admin("user", "add", "bad/name").returncode != 0


def test_tokens_and_codes_are_stored_hashed(server: Server) -> None:
    code = server.add_user("alice")
    token = enrol(server, "alice", code=code)
    db = (server.data / "stasis.db").read_bytes() + b"".join(p.read_bytes() for p in server.data.glob("stasis.db-*"))
    assert token.encode() not in db and code.encode() not in db
    assert secrets.compare_digest(token, token)


def test_device_list_for_every_user(server: Server) -> None:
    enrol(server, "alice")
    enrol(server, "bob", device="phone")
    listing = server.admin("device", "list")
    assert "alice" in listing.stdout and "laptop" in listing.stdout and "bob" in listing.stdout and "phone" in listing.stdout
    assert "phone" not in server.admin("device", "list", "alice").stdout


def test_hostile_input_gets_a_4xx_with_a_code(server: Server) -> None:
    token = enrol(server, "alice")
    data = b"an object"
    requests.put(obj(server, "laptop", data), data=data, headers=auth(token), timeout=10)
    huge = requests.get(obj(server, "laptop", data), headers={**auth(token), "Range": "bytes=" + "9" * 5000 + "-"}, timeout=10)
    assert huge.status_code == 416 and huge.json()["code"] == "range_not_satisfiable"
    nan = requests.post(f"{server.url}/v1/enrol", data=b'{"user": "alice", "code": "x", "verifier": "00", "kdf": {"name": "argon2id", '
                        b'"iterations": NaN, "memory_kib": 64, "lanes": 1}, "device": "d", "envelope": "x"}',
                        headers={"Content-Type": "application/json"}, timeout=10)
    assert nan.status_code == 400 and nan.json()["code"] == "malformed"
    newline = requests.post(f"{server.url}/v1/users/alice/login", json={"verifier": "00" * 32 + "\n"}, timeout=10)
    assert newline.status_code == 400 and newline.json()["code"] == "malformed"
    session = login(server, "alice").json()["token"]
    device = requests.post(f"{server.url}/v1/devices", json={"name": "phone\n"}, headers=auth(session), timeout=10)
    assert device.status_code == 400
    assert requests.get(f"{server.url}/v1/devices/laptop%0A/objects/data/", headers=auth(token), timeout=10).status_code == 404
    gone = obj(server, "laptop", b"never stored")
    missing = requests.delete(gone, headers=auth(token), timeout=10)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert requests.delete(obj(server, "laptop", data), headers=auth(token), timeout=10).status_code == 200
    assert requests.delete(obj(server, "laptop", data), headers=auth(token), timeout=10).json()["code"] == "not_found"
    assert requests.get(f"{server.url}/v1/no/such/route", timeout=10).json()["code"] == "not_found"
