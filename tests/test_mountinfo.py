"""The one mountinfo parser: paths come back byte for byte, whatever characters they hold."""

from __future__ import annotations

from stasisfs.system.mountinfo import parse, unescape

LINE = b"36 35 0:45 / %s rw,relatime shared:1 - fuse.stasisfs stasisfs rw,user_id=0\n"


def test_octal_escapes_come_back_as_the_bytes_they_stand_for() -> None:
    assert unescape(rb"/mnt/a\040b\011c\012d\134e") == b"/mnt/a b\tc\nd\\e"


def test_a_mount_point_with_a_space_an_accent_and_invalid_utf8_parses_exactly() -> None:
    [entry] = parse(LINE % rb"/tmp/caf\303\251\040mnt/\377raw")
    assert entry.mountpoint == "/tmp/café mnt/".encode() + b"\xffraw"
    assert entry.device == "0:45" and entry.fstype == b"fuse.stasisfs" and entry.source == b"stasisfs"


def test_optional_fields_and_malformed_lines() -> None:
    table = (b"22 1 8:1 / / rw shared:1 master:2 - ext4 /dev/sda1 rw\n"
             b"garbage without a separator\n"
             b"23 22 0:21 / /proc rw - proc proc rw\n")
    assert [(e.mountpoint, e.fstype, e.device) for e in parse(table)] == [(b"/", b"ext4", "8:1"), (b"/proc", b"proc", "0:21")]
