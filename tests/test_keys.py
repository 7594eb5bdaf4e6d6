import os

import pytest

from stasisfs.errors import UsageError, WrongKey
from stasisfs.format import keyslots


def test_wrap_unwrap_and_wrong_password() -> None:
    master, repo_id = os.urandom(32), os.urandom(32)
    slot = keyslots.wrap(master, repo_id, b"pw", keyslots.SLOT_PASSWORD, keyslots.argon2_params())
    decoded = keyslots.KeySlot.decode(slot.encode())
    assert keyslots.unwrap(decoded, repo_id, b"pw") == master
    with pytest.raises(WrongKey):
        keyslots.unwrap(decoded, repo_id, b"other")
    with pytest.raises(WrongKey):
        keyslots.unwrap(decoded, os.urandom(32), b"pw")  # bound to its repository


def test_default_kdf_is_strong_without_test_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(keyslots.INSECURE_TEST_KDF_ENV, raising=False)
    params = keyslots.argon2_params()
    assert params["memory_kib"] == 64 * 1024 and params["iterations"] == 3


@pytest.mark.parametrize("paper", [False, True])
def test_recovery_key_roundtrip(paper: bool) -> None:
    master = os.urandom(32)
    assert keyslots.parse_recovery_key(keyslots.format_recovery_key(master, paper)) == master


def test_paper_key_typo_names_the_line() -> None:
    text = keyslots.format_recovery_key(os.urandom(32), paper=True).splitlines()
    line = text[1]
    pos = line.index(":") + 2
    wrong = "B" if line[pos] != "B" else "C"
    text[1] = line[:pos] + wrong + line[pos + 1 :]
    with pytest.raises(UsageError, match="line 2"):
        keyslots.parse_recovery_key("\n".join(text))


def test_plain_key_typo_detected() -> None:
    text = keyslots.format_recovery_key(os.urandom(32))
    broken = ("B" if text[0] != "B" else "C") + text[1:]
    with pytest.raises(UsageError):
        keyslots.parse_recovery_key(broken)


@pytest.mark.parametrize("weak", ["password123", "short", "qwertyuiop", "aaaaaaaaaaaaaa"])
def test_weak_passwords_refused_with_reason(weak: str) -> None:
    reason = keyslots.password_weakness(weak)
    assert reason and "password" in reason


def test_strong_passphrase_accepted() -> None:
    assert keyslots.password_weakness("correct horse battery staple") is None


def test_machine_key_file_roundtrip() -> None:
    text = keyslots.format_machine_key(b"\x01" * 32, "abcd", b"s" * 32)
    assert keyslots.parse_machine_key(text) == ((b"\x01" * 32).hex(), "abcd", b"s" * 32)
