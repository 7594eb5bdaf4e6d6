"""What a new user trips over (issue 21): each runs the command as a user would and checks exit code and words."""

from __future__ import annotations

import json
import os

import pytest
from conftest import Cli

from stasisfs.cli.remote import plain_http_off_this_machine

pytestmark = pytest.mark.timeout(120)


def test_no_repository_given_exits_10(cli: Cli) -> None:
    env = {k: v for k, v in cli.env.items() if k != "STASISFS_REPO"}
    done = Cli(env, cli.repo, cli.tmp).run("snapshots")
    assert done.returncode == 10 and b"--repo" in done.stderr


def test_counts_read_as_sentences(cli: Cli) -> None:
    cli.init()
    src = cli.tree({"a": "a"})
    cli.backup(src)
    assert cli.ok("snapshots").stdout.decode().splitlines()[-1] == "1 snapshot"
    cli.backup(src)
    assert cli.ok("snapshots").stdout.decode().splitlines()[-1] == "2 snapshots"


def test_one_missing_path_among_several_saves_the_rest_and_exits_3(cli: Cli) -> None:
    cli.init()
    here = cli.tmp / "here"
    here.mkdir()
    (here / "kept.txt").write_text("still backed up")
    unplugged = cli.tmp / "usb-disk"
    done = cli.run("backup", here, unplugged)
    assert done.returncode == 3 and str(unplugged).encode() in done.stderr and b"does not exist" in done.stderr
    [snapshot] = cli.snapshots()
    assert snapshot["paths"] == [str(here)]
    cli.ok("restore", "latest", "--target", cli.tmp / "out")
    assert (cli.tmp / "out" / str(here).lstrip("/") / "kept.txt").read_text() == "still backed up"
    nothing = cli.run("backup", unplugged, cli.tmp / "also-gone")
    assert nothing.returncode == 1 and b"nothing to back up" in nothing.stderr and b"Traceback" not in nothing.stderr


def test_plain_http_to_another_machine_is_warned_about(cli: Cli) -> None:
    done = cli.run("remote", "add", "home", "http://backup.example.org:8443", "--user", "alice")  # no repository: nothing is sent
    assert b"plain http to another machine" in done.stderr and done.returncode == 10
    assert plain_http_off_this_machine("http://10.1.2.3:80") and plain_http_off_this_machine("http://nas.local")
    assert not plain_http_off_this_machine("http://127.0.0.1:8080") and not plain_http_off_this_machine("http://localhost:1")
    assert not plain_http_off_this_machine("http://[::1]:8080") and not plain_http_off_this_machine("https://nas.local")


def test_the_paper_key_is_accepted_without_line_numbers_and_pins_typos(cli: Cli) -> None:
    cli.init()
    paper = cli.ok("key", "export", "--paper").stdout.decode()
    lines = [line for line in paper.splitlines() if "[" in line]
    bare = "\n".join("   " + line.split(":", 1)[1].replace(" ", "  ") for line in lines) + "\n"
    env = {"STASISFS_NEW_PASSWORD": "another long passphrase of words"}
    cli.ok("key", "import", input=bare.encode(), env=env)
    body = lines[2].split(":", 1)[1]
    first = body.strip()[0]
    typo = "\n".join([*lines[:2], f"3:{body.replace(first, 'B' if first != 'B' else 'C', 1)}", *lines[3:]]) + "\n"
    wrong = cli.run("key", "import", input=typo.encode(), env=env)
    assert wrong.returncode != 0 and b"line 3 has a typo" in wrong.stderr
    assert len(json.loads(cli.ok("key", "list", "--json").stdout)) == 2


def test_latest_with_a_path_is_the_newest_snapshot_holding_it_and_filters_narrow(cli: Cli) -> None:
    cli.init()
    docs, photos = cli.tmp / "Documents", cli.tmp / "Photos"
    docs.mkdir()
    photos.mkdir()
    (docs / "thesis.odt").write_text("chapter one")
    (photos / "cat.jpg").write_text("meow")
    in_docs = cli.backup(docs, "--tag", "work")
    cli.backup(photos)  # now the newest snapshot of all, and it does not hold Documents
    restored = cli.run("restore", f"latest:{docs}", "--target", cli.tmp / "out")
    assert restored.returncode == 0, restored.stderr.decode()
    assert (cli.tmp / "out" / "thesis.odt").read_text() == "chapter one"
    assert cli.ok("dump", f"latest:{docs}/thesis.odt").stdout == b"chapter one"
    listed = json.loads(cli.ok("snapshots", "--json", "--tag", "work").stdout)
    assert [s["id"] for s in listed] == [in_docs]
    assert [s["id"] for s in json.loads(cli.ok("snapshots", "--json", "--path", str(photos)).stdout)] != [in_docs]
    assert b"thesis.odt" in cli.ok("ls", "latest", "--path", str(docs)).stdout
    # A path that is in no snapshot, and one missing from the snapshot chosen, each name what was looked at.
    nowhere = cli.run("restore", f"latest:{cli.tmp / 'Music'}", "--target", cli.tmp / "out2")
    assert nowhere.returncode == 2 and b"no snapshot holding" in nowhere.stderr
    missing = cli.run("dump", f"latest:{docs}/gone.txt")
    assert missing.returncode == 2 and in_docs[:8].encode() in missing.stderr and b"newest holding" in missing.stderr
    # forget with a filter touches only what passes it.
    again = cli.backup(docs, "--tag", "work")
    photos_id = next(str(s["id"]) for s in cli.snapshots() if s["id"] not in (in_docs, again))
    cli.ok("forget", "--keep-last", "1", "--tag", "work")
    assert sorted(str(s["id"]) for s in cli.snapshots()) == sorted([again, photos_id])


def test_one_damaged_pack_is_one_problem_and_verify_says_what_it_checked(cli: Cli) -> None:
    cli.init()
    cli.backup(cli.tree({f"f{n}": os.urandom(300_000) for n in range(5)}))
    verified = cli.ok("restore", "latest", "--target", cli.tmp / "out", "--verify")
    assert b"restored 5 files" in verified.stderr and b"verified: 5 files read back from disk match their chunk ids" in verified.stderr
    # The largest pack holds file data from its first byte (a pack of trees alone is mostly padding).
    pack = max((p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[1000] ^= 0xFF
    pack.write_bytes(bytes(data))
    checked = cli.run("check", "--read-data")
    assert checked.returncode == 1 and b"check found 1 problem\n" in checked.stderr, checked.stderr.decode()
    assert checked.stderr.count(b"affected: ") >= 1


def test_the_progress_total_counts_what_the_summary_counts(cli: Cli) -> None:
    import re
    import threading

    from stasisfs.backup.pipeline import count_tree
    from stasisfs.backup.walk import WalkRules
    from stasisfs.progress import Counters

    cli.init()
    src = cli.tree({"a.txt": "a", "b.iso": "big", "sub/c.txt": "c", "skip/d.txt": "d"})
    (src / "link").symlink_to("a.txt")
    os.mkfifo(src / "fifo")
    excludes = ["*.iso", "skip/"]
    done = cli.ok("backup", src, *[arg for pattern in excludes for arg in ("--exclude", pattern)])
    processed = int(re.search(rb"processed (\d+) files", done.stderr)[1])  # type: ignore[index]
    counters = Counters()
    count_tree([os.fsencode(src)], counters, threading.Event(), WalkRules(excludes, False, cli.repo))
    assert counters.total_files == processed == 2


def test_the_summary_counts_agree_with_each_other(cli: Cli) -> None:
    import re

    cli.init()
    src = cli.tree({"base": "data", "large": os.urandom(20_000_000), "sub/x": "x"})
    for n in range(5):
        os.link(src / "base", src / f"hard{n}")
    (src / "link").symlink_to("base")
    os.mkfifo(src / "fifo")
    done = cli.ok("backup", src).stderr
    new = int(re.search(rb"files: (\d+) new", done)[1])  # type: ignore[index]
    processed = int(re.search(rb"processed (\d+) files", done)[1])  # type: ignore[index]
    assert new == processed == 8, done.decode()
    assert b"MB" not in done and b"KB" not in done  # IEC units throughout
