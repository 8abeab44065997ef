"""Shared fixtures: one local AWS per session (reset per test) and a fake IMDS per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.imds import FakeIMDS
from tests.localaws import LocalAWS


@pytest.fixture(scope="session")
def local_aws() -> Iterator[LocalAWS]:
    with LocalAWS() as aws:
        yield aws


@pytest.fixture
def aws(local_aws: LocalAWS) -> LocalAWS:
    """The session's local AWS, wiped clean for this test."""
    local_aws.reset()
    return local_aws


@pytest.fixture
def imds() -> Iterator[FakeIMDS]:
    with FakeIMDS() as fake:
        yield fake
