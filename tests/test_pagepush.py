"""The page-push helper's wire formats: FUSE notify messages and the mount's requests."""

from __future__ import annotations

import os
import select
import struct

from stasisfs.mount.pagepush import FUSE_NOTIFY_STORE, decode_request, encode_requests, store_message


def test_a_store_message_is_a_fuse_notify_store() -> None:
    data = b"hello, page cache"
    message = b"".join(store_message(42, data, offset=8192))
    length, code, unique = struct.unpack_from("<IiQ", message)
    nodeid, offset, size, padding = struct.unpack_from("<QQII", message, 16)
    assert (length, code, unique) == (len(message), FUSE_NOTIFY_STORE, 0)  # unique 0 marks a notification
    assert (nodeid, offset, size, padding) == (42, 8192, len(data), 0)
    assert message[40:] == data


def test_requests_are_split_into_frames_a_pipe_writes_whole() -> None:
    files = [(inode, [os.urandom(32) for _ in range(inode % 5 + 1)]) for inode in range(2, 200)]
    frames = encode_requests(files)
    assert len(frames) > 1 and all(len(frame) <= select.PIPE_BUF for frame in frames)
    decoded = []
    for frame in frames:
        (length,) = struct.unpack_from("<I", frame)
        assert length == len(frame) - 4
        decoded += decode_request(frame[4:])
    assert decoded == files


def test_a_file_with_too_many_chunks_to_name_is_left_to_ordinary_reads() -> None:
    huge = (7, [os.urandom(32) for _ in range(200)])
    small = (8, [os.urandom(32)])
    assert [decode_request(frame[4:]) for frame in encode_requests([huge, small])] == [[small]]
