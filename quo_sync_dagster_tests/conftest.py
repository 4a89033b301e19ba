from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from moto import mock_aws

from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.sandbox.quo_server import QuoSandbox
from quo_sync_dagster_tests.pipeline import Pipeline, pipeline


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuoSandbox]:
    """A Quo sandbox on 127.0.0.1 for one test module, limit off; it must never hold two
    contacts with one (source, externalId)."""
    with QuoSandbox(tmp_path_factory.mktemp("quo"), rate_limit=None) as sb:
        yield sb
        assert sb.stats()["duplicateExternalIds"] == 0


@pytest.fixture
def p(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    """The sync pipeline on a temporary Dagster instance, store and Quo sandbox."""
    with pipeline(tmp_path, monkeypatch) as p:
        yield p


@pytest.fixture
def quo(p: Pipeline) -> Iterator[QuoClient]:
    """A Quo client of the pipeline's sandbox, to read and change what the sync wrote."""
    with QuoClient(p.quo.url, p.quo.api_key, max_attempts=2) as client:
        yield client


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's AWS, isolated from any real AWS configuration of the machine."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    with mock_aws():
        yield
