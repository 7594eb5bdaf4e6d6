"""Fuzzing the live API from its own OpenAPI document (schemathesis): hostile input never gets a 5xx.

Each operation gets generated requests, valid and invalid, with a real device token, and
with none. Every answer must be below 500, and every refusal a JSON body with a stable `code`.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from server_fixture import TEST_ENVELOPE, TEST_KDF, Server

pytestmark = pytest.mark.timeout(600)
EXAMPLES_PER_OPERATION = 40  # per operation and mode (valid, invalid), each sent with a token and without


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    server = Server(Path(tmp_path_factory.mktemp("fuzz")) / "data")
    server.start()
    code = server.add_user("alice", "--quota", "100000000")
    answer = requests.post(f"{server.url}/v1/enrol", json={"user": "alice", "code": code, "verifier": hashlib.sha256(b"alice").hexdigest(),
                                                          "kdf": TEST_KDF, "device": "laptop", "envelope": TEST_ENVELOPE}, timeout=30)
    assert answer.status_code == 200, answer.text
    yield server, str(answer.json()["token"])
    server.stop()


def test_no_request_gets_a_server_error(live_server: tuple[Server, str]) -> None:
    server, token = live_server
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 15
    sent = 0
    for operation, mode in itertools.product(operations, (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def fuzz(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
            nonlocal sent
            for headers in ({"Authorization": f"Bearer {token}"}, {}):
                response = case.call(base_url=server.url, headers=headers, timeout=30)
                sent += 1
                where = f"{case.method} {case.formatted_path}"
                assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
                if response.status_code >= 400 and case.method != "HEAD":
                    code = response.json().get("code")
                    assert isinstance(code, str) and code, f"{where}: {response.text[:300]}"

        try:
            fuzz()
        except Unsatisfiable:
            assert mode == schemathesis.GenerationMode.NEGATIVE  # an operation without inputs has no invalid form
    print(f"\nfuzzer: {sent} requests over {len(operations)} operations")
    assert sent >= len(operations) * 2
