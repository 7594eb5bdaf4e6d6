"""Damage stays where it is: a bad snapshot or index object hides only itself, is named, and heals from a remote."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import Cli
from server_fixture import Server

pytestmark = pytest.mark.timeout(240)


def two_snapshots(cli: Cli) -> tuple[Path, str, str]:
    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    (src / "a.txt").write_text("first")
    first = cli.backup(src)
    (src / "b.txt").write_text("second")
    second = cli.backup(src)
    return src, first, second


def flip_a_byte(path: Path, at: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_named_and_rest_works(cli: Cli, bad_id: str, good_id: str, src: Path) -> None:
    listed = cli.run("snapshots", "--json")
    assert listed.returncode == 3, listed.stderr.decode()
    assert [s["id"] for s in json.loads(listed.stdout)] == [good_id]
    assert bad_id.encode() in listed.stderr and b"Traceback" not in listed.stderr
    restored = cli.run("restore", good_id, "--target", cli.tmp / "out")
    assert restored.returncode == 3 and bad_id.encode() in restored.stderr
    assert (cli.tmp / "out" / str(src).lstrip("/") / "b.txt").read_text() == "second"
    checked = cli.run("check")
    assert checked.returncode == 1 and bad_id.encode() in checked.stderr + checked.stdout


def test_one_damaged_snapshot_object_hides_only_itself(cli: Cli) -> None:
    src, first, second = two_snapshots(cli)
    flip_a_byte(cli.repo / "snapshots" / first)
    shutil.rmtree(cli.tmp / "cache")  # read it from the repository, not the cache
    assert_named_and_rest_works(cli, first, second, src)
    # Prune frees nothing while a snapshot cannot be read; `repair snapshots --forget` sets it aside.
    pruned = cli.run("prune")
    assert pruned.returncode == 1 and b"damaged" in pruned.stderr and b"repair snapshots --forget" in pruned.stderr
    cli.ok("repair", "snapshots", "--forget")
    assert [s["id"] for s in cli.snapshots()] == [second]
    cli.ok("prune")
    cli.ok("check", "--read-data")


def test_a_foreign_snapshot_object_is_named_and_skipped(cli: Cli) -> None:
    src, first, second = two_snapshots(cli)
    other = Cli(env={**cli.env, "STASISFS_REPO": str(cli.tmp / "other")}, repo=cli.tmp / "other", tmp=cli.tmp)
    other.init()
    foreign = other.backup(src)
    shutil.copy(other.repo / "snapshots" / foreign, cli.repo / "snapshots" / foreign)
    listed = cli.run("snapshots", "--json")
    assert listed.returncode == 3 and foreign.encode() in listed.stderr and b"another repository" in listed.stderr
    assert {s["id"] for s in json.loads(listed.stdout)} == {first, second}


def test_a_damaged_index_object_is_named_by_check_and_healed_by_the_repair_it_names(cli: Cli) -> None:
    src, _, second = two_snapshots(cli)
    index_object = sorted((cli.repo / "index").iterdir())[0]
    flip_a_byte(index_object)
    checked = cli.run("check")
    assert checked.returncode == 1 and index_object.name[:16].encode() in checked.stderr + checked.stdout
    cli.ok("repair", "index")
    cli.ok("check")
    cli.ok("restore", second, "--target", cli.tmp / "out")
    assert (cli.tmp / "out" / str(src).lstrip("/") / "a.txt").read_text() == "first"


def test_a_damaged_index_object_under_a_lost_cache_is_healed_and_said(cli: Cli) -> None:
    two_snapshots(cli)
    index_object = sorted((cli.repo / "index").iterdir())[0]
    flip_a_byte(index_object)
    shutil.rmtree(cli.tmp / "cache")  # the cache is rebuilt from the repository, and from pack headers where it must
    listed = cli.ok("snapshots")
    assert index_object.name.encode() in listed.stderr and b"from their headers" in listed.stderr
    cli.ok("check", "--read-data")


def test_repair_heals_a_damaged_snapshot_object_from_the_remote(cli: Cli, server: Server) -> None:
    _, first, second = two_snapshots(cli)
    cli.add_remote(server)
    cli.ok("sync")
    flip_a_byte(cli.repo / "snapshots" / first)
    shutil.rmtree(cli.tmp / "cache")
    assert cli.run("snapshots").returncode == 3
    repaired = cli.ok("repair")
    assert b"1 snapshot and index objects healed" in repaired.stderr
    assert {s["id"] for s in cli.snapshots()} == {first, second}
    cli.ok("check")


@pytest.mark.parametrize("kdf", [
    {"name": "argon2id", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "iterations": 3, "memory_kib": 4 * 1024 * 1024, "lanes": 4},
    {"name": "argon2id", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "iterations": -1, "memory_kib": 64, "lanes": 1},
    {"name": "argon2id", "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "iterations": "many", "memory_kib": 64, "lanes": 1},
])
def test_a_planted_key_slot_with_absurd_parameters_is_refused_at_once(cli: Cli, kdf: dict[str, object]) -> None:
    import time

    cli.init()
    real = next((cli.repo / "keys").iterdir())
    planted = json.loads(real.read_text())
    planted.update(id="00000000deadbeef", kdf=kdf)
    (cli.repo / "keys" / "00000000deadbeef").write_text(json.dumps(planted))
    started = time.monotonic()
    listed = cli.run("snapshots")
    assert listed.returncode == 0 and b"00000000deadbeef" in listed.stderr and b"Traceback" not in listed.stderr
    assert time.monotonic() - started < 20
    real.unlink()  # with only the planted slot left: a clear refusal, naming it
    alone = cli.run("snapshots")
    assert alone.returncode == 12 and b"00000000deadbeef" in alone.stderr and b"Traceback" not in alone.stderr


def test_a_junk_config_on_the_server_gives_a_clear_error(cli: Cli, server: Server) -> None:
    import hashlib

    import requests

    cli.init()
    recovery_key = cli.ok("key", "export").stdout
    cli.add_remote(server)
    doc = next((cli.tmp / "home" / ".config" / "stasisfs" / "repositories").glob("*/remotes.json"))
    token = json.loads(doc.read_text())["remotes"][0]["token"]
    for config_id, _ in [(i["id"], i["size"]) for i in requests.get(f"{server.url}/v1/devices/testbox/objects/config/",
                                                                      headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["objects"]]:
        path = next(server.data.glob(f"objects/*/config/{config_id[:2]}/{config_id}"))
        path.write_bytes(b"{not json")
    junk = b"{not json either"
    requests.put(f"{server.url}/v1/devices/testbox/objects/config/{hashlib.sha256(junk).hexdigest()}", data=junk,
                 headers={"Authorization": f"Bearer {token}"}, timeout=10)
    cli.wipe_device()
    recovered = cli.run("recover", server.url, "--user", "alice", "--recovery-key", input=recovery_key)
    assert recovered.returncode in (1, 12) and b"Traceback" not in recovered.stderr and b"JSONDecodeError" not in recovered.stderr
    assert b"config" in recovered.stderr or b"recovery key" in recovered.stderr


def test_one_flipped_byte_in_a_big_pack_loses_exactly_the_file_it_hit(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from conftest import PASSWORD

    from stasisfs.format.pack import BLOB_DATA
    from stasisfs.repo.repository import Credential, Repository

    cli.init()
    src = cli.tmp / "src"
    src.mkdir()
    for n in range(120):  # each file under the chunker's minimum: one chunk each, in one or two 16 MiB packs
        (src / f"file{n:03d}").write_bytes(os.urandom(200_000))
    cli.backup(src)
    monkeypatch.setenv("XDG_CACHE_HOME", cli.env["XDG_CACHE_HOME"])
    repo = Repository(cli.repo)
    repo.unlock(Credential(password=PASSWORD))
    pack = max(repo.indexed_packs().values(), key=lambda p: len(p.blobs))
    entry = [e for e in pack.blobs if e.kind == BLOB_DATA][len(pack.blobs) // 2]
    hit = next(p.name for p in src.iterdir() if repo.master_keys.chunk_id_of(p.read_bytes()) == entry.chunk_id)
    path = repo.pack_path(pack.pack_id)
    repo.close()
    flip_a_byte(path, entry.offset + entry.length // 2)
    checked = cli.run("check", "--read-data")
    affected = [line for line in checked.stderr.decode().splitlines() if "affected:" in line]
    assert checked.returncode == 1 and len(affected) == 1 and affected[0].endswith(f"/{hit}"), affected
    restored = cli.run("restore", "latest", "--target", cli.tmp / "before")
    assert restored.returncode == 1 and hit.encode() in restored.stderr
    done = cli.ok("repair", "snapshots", "--forget")
    dropped = [line for line in done.stdout.decode().splitlines() if line.startswith("dropped: ")]
    assert len(dropped) == 1 and dropped[0].endswith(f"/{hit}"), dropped
    cli.ok("check", "--read-data")
    cli.ok("restore", "latest", "--target", cli.tmp / "out")
    out = cli.tmp / "out" / str(src).lstrip("/")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir() if p.name != hit)
    for p in out.iterdir():
        assert p.read_bytes() == (src / p.name).read_bytes()


def scramble_data_pages(index_dir: Path) -> None:
    """Random bytes over every page but the two meta pages: what made every command die of SIGBUS before."""
    import random

    data_file = index_dir / "data.mdb"
    data = bytearray(data_file.read_bytes())
    rng = random.Random(7)
    for page in range(2, len(data) // 4096):
        for at in range(page * 4096 + 16, page * 4096 + 4096, 7):
            data[at] = rng.randrange(256)
    data_file.write_bytes(bytes(data))


@pytest.mark.parametrize("command", [["repair", "index"], ["snapshots"], ["check"], ["restore", "latest", "--target", "OUT"], ["backup", "SRC"]])
def test_a_scrambled_cache_is_rebuilt_never_fatal(cli: Cli, command: list[str]) -> None:
    src, _, _ = two_snapshots(cli)
    for n in range(200):
        (src / f"more{n}").write_bytes(os.urandom(2000))
    cli.backup(src)
    [index_dir] = list((cli.tmp / "cache").glob("stasisfs/*/index"))
    scramble_data_pages(index_dir)
    args = [str(src) if a == "SRC" else str(cli.tmp / "out") if a == "OUT" else a for a in command]
    done = cli.run(*args)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    if command != ["repair", "index"]:
        assert b"rebuilt from the repository" in done.stderr
    assert len(cli.snapshots()) >= 3
    cli.ok("check", "--read-data")


@pytest.mark.parametrize("body", [b"not json at all", b'{"salt": 7}', b"[]", b'{"salt": "00", "kdf": {"name": "argon2id", "iterations": "x"}}'])
def test_a_hostile_servers_junk_answers_give_a_clear_error(cli: Cli, body: bytes) -> None:
    import http.server
    import threading

    class Junk(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_PUT = do_GET

        def log_message(self, *args: object) -> None:
            """Silent: http.server would log every request to stderr."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Junk)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = cli.run("recover", f"http://127.0.0.1:{server.server_address[1]}", "--user", "alice")
    finally:
        server.shutdown()
    assert done.returncode != 0 and b"Traceback" not in done.stderr, done.stderr.decode()
    assert b"malformed" in done.stderr or b"refusing" in done.stderr
