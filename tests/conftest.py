"""Shared fixtures. Keep each group small and under its own heading.

Store fixtures:
- ``s3_server`` (session): one loopback SeaweedFS S3 server for the whole run.
- ``s3_store_url``: a fresh, empty ``s3://`` store (its own prefix in the
  shared bucket) with the AWS_* environment pointing at ``s3_server``.
- ``store_url``: parametrized over ``file`` and ``s3``; any test that takes it
  runs once against each backend.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.seaweed import SeaweedServer, SeaweedUnavailable

# -- stores ------------------------------------------------------------------

#: One bucket for the session: SeaweedFS gives every bucket its own volume
#: collection, so a bucket per test would eat the volume budget. Tests are
#: isolated by prefix instead.
S3_TEST_BUCKET = "snapfs-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    try:
        server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    except SeaweedUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so S3 tests must run: {exc}")
        pytest.skip(str(exc))
    with server:
        server.create_bucket(S3_TEST_BUCKET)
        yield server


@pytest.fixture
def s3_env(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Point boto3 (in this process and in children) at ``s3_server`` only."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # A developer's ~/.aws must not leak profiles, regions or endpoints in.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_store_url(s3_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A fresh, empty S3 store URL; ``open_store(url)`` works as is."""
    test_name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60].strip("-")
    return f"s3://{S3_TEST_BUCKET}/{test_name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def file_store_url(tmp_path: Path) -> str:
    """A fresh, empty local store URL."""
    return "file://" + str(tmp_path / "store")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest) -> str:
    """A fresh store URL of each backend kind."""
    return request.getfixturevalue(f"{request.param}_store_url")


from support.faultproxy import fault_proxy  # noqa: E402, F401
