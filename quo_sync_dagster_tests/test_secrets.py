"""Secrets the product writes itself: the file backend (0600 files in a 0700 directory) and AWS
Secrets Manager (through moto: no network, no real credentials)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, ParamValidationError

from quo_sync_dagster.secrets import (
    MissingSecret,
    SecretWriteError,
    delete_secret,
    resolve_secret,
    secrets_dir,
    store_secret,
)

VALUE = "wh-s3cr3t-0f-attio"


@pytest.fixture
def vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file backend on a secrets directory that does not exist yet."""
    directory = tmp_path / "state" / "secrets"
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", str(directory))
    monkeypatch.delenv("QUO_SYNC_SECRET_BACKEND", raising=False)
    return directory


@pytest.fixture
def aws_sm(aws: None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """store_secret on AWS Secrets Manager under moto, isolated from any real AWS setup."""
    monkeypatch.setenv("QUO_SYNC_SECRET_BACKEND", "aws-sm")
    return boto3.client("secretsmanager")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- where the files go -------------------------------------------------------------------------
def test_secrets_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QUO_SYNC_SECRETS_DIR", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("QUO_SYNC_SECRET_BACKEND", raising=False)
    assert secrets_dir() == tmp_path / "home" / ".quo_sync" / "secrets"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    assert secrets_dir() == tmp_path / "dagster" / "secrets"
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", "")  # empty is unset
    assert secrets_dir() == tmp_path / "dagster" / "secrets"
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", str(tmp_path / "explicit"))
    assert secrets_dir() == tmp_path / "explicit"
    # A relative setting is made absolute, so the reference works from any directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUO_SYNC_SECRETS_DIR", "rel/secrets")
    ref = store_secret("n", VALUE)
    assert ref == f"file:{tmp_path / 'rel' / 'secrets' / 'n'}"
    monkeypatch.chdir("/")
    assert resolve_secret(ref) == VALUE


# ---- file backend -------------------------------------------------------------------------------
def test_file_round_trip_replace_and_permissions(vault: Path) -> None:
    previous_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        ref = store_secret("attio/int-1/webhook", VALUE)
    finally:
        os.umask(previous_umask)
    assert ref.startswith("file:/")
    path = Path(ref.removeprefix("file:"))
    assert path.parent == vault
    assert mode(vault) == 0o700
    assert mode(path) == 0o600
    assert resolve_secret(ref) == VALUE

    assert store_secret("attio/int-1/webhook", "rotated") == ref  # same name: replaced
    assert resolve_secret(ref) == "rotated"
    assert mode(path) == 0o600
    assert sorted(p.name for p in vault.iterdir()) == [path.name]  # no temp file left behind


@pytest.mark.parametrize("value", ["two\nlines", "ends in newline\n", "crlf\r\n", " pad ", "ключ"])
def test_file_values_round_trip_exactly(vault: Path, value: str) -> None:
    assert resolve_secret(store_secret("odd", value)) == value


def test_a_loose_existing_directory_is_tightened(vault: Path) -> None:
    vault.mkdir(parents=True, mode=0o755)
    vault.chmod(0o755)
    store_secret("x", VALUE)
    assert mode(vault) == 0o700


def test_distinct_names_never_share_a_file(vault: Path) -> None:
    names = ["a/b", "a_b", "a%2Fb", "a b", "a:b", ".hidden", "a/"]
    refs = {name: store_secret(name, f"value of {name}") for name in names}
    assert len(set(refs.values())) == len(names)
    for name, ref in refs.items():
        assert resolve_secret(ref) == f"value of {name}"
        assert Path(ref.removeprefix("file:")).parent == vault


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "../outside",
        "a/../../etc/passwd",
        "a/./b",
        "/etc/passwd",
        "a\\..\\b",
        "",
        "nul\x00byte",
        "new\nline",
    ],
)
def test_unsafe_names_are_refused_naming_the_name_not_the_value(vault: Path, name: str) -> None:
    with pytest.raises(ValueError) as raised:
        store_secret(name, VALUE)
    assert repr(name) in str(raised.value)
    assert VALUE not in str(raised.value)
    assert not vault.exists()  # nothing written anywhere near it
    assert not (vault.parent.parent / "outside").exists()


def test_empty_value_too_long_name_and_unknown_backend_are_refused(
    vault: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="'n'"):
        store_secret("n", "")
    with pytest.raises(ValueError, match="too long"):
        store_secret("é" * 60, VALUE)  # 60 characters, 360 bytes once escaped
    monkeypatch.setenv("QUO_SYNC_SECRET_BACKEND", "vault")
    with pytest.raises(ValueError, match="'vault'") as raised:
        store_secret("n", VALUE)
    assert VALUE not in str(raised.value)
    assert not vault.exists()


def test_unreadable_file_refs_are_named(vault: Path) -> None:
    missing = f"file:{vault / 'never-stored'}"
    with pytest.raises(MissingSecret, match="never-stored") as raised:
        resolve_secret(missing)
    assert repr(missing) in str(raised.value)

    vault.mkdir(parents=True)
    (vault / "empty").write_text("\n")
    with pytest.raises(MissingSecret, match="empty"):
        resolve_secret(f"file:{vault / 'empty'}")
    with pytest.raises(MissingSecret, match="IsADirectoryError"):
        resolve_secret(f"file:{vault}")
    (vault / "binary").write_bytes(b"\xffs3cr3t-bytes")
    with pytest.raises(MissingSecret, match="UnicodeDecodeError") as raised:
        resolve_secret(f"file:{vault / 'binary'}")
    assert "s3cr3t" not in str(raised.value)
    with pytest.raises(MissingSecret, match="'file:'"):
        resolve_secret("file:")


def test_relative_file_ref_is_under_the_secrets_dir(vault: Path) -> None:
    vault.mkdir(parents=True)
    (vault / "operator-key").write_text("op-value\n")  # written by hand, with echo's newline
    assert resolve_secret("file:operator-key") == "op-value"


def test_delete_file_secret(vault: Path, tmp_path: Path) -> None:
    ref = store_secret("zoho/int-9/channel-token", VALUE)
    kept = store_secret("zoho/int-10/channel-token", "other")
    delete_secret(ref)
    with pytest.raises(MissingSecret, match="channel-token"):
        resolve_secret(ref)
    delete_secret(ref)  # already gone: fine
    assert resolve_secret(kept) == "other"

    # Files the product did not write are never deleted.
    outside = tmp_path / "operator-managed"
    outside.write_text("keep me")
    with pytest.raises(ValueError, match="outside the secrets directory"):
        delete_secret(f"file:{outside}")
    with pytest.raises(ValueError, match="outside the secrets directory"):
        delete_secret(f"file:{vault}/../../operator-managed")
    assert outside.read_text() == "keep me"
    with pytest.raises(ValueError, match="'env:QUO_KEY'"):
        delete_secret("env:QUO_KEY")


# ---- AWS Secrets Manager ------------------------------------------------------------------------
def test_aws_store_creates_then_puts_and_deletes(aws_sm: Any) -> None:
    ref = store_secret("quo/int-1/webhook", VALUE)
    assert ref == "aws-sm:quo/int-1/webhook"
    assert aws_sm.get_secret_value(SecretId="quo/int-1/webhook")["SecretString"] == VALUE
    assert resolve_secret(ref) == VALUE

    assert store_secret("quo/int-1/webhook", "rotated") == ref  # exists: a new version
    assert resolve_secret(ref) == "rotated"
    assert len(aws_sm.list_secrets()["SecretList"]) == 1

    delete_secret(ref)
    with pytest.raises(MissingSecret, match="quo/int-1/webhook"):
        resolve_secret(ref)
    delete_secret(ref)  # already gone: fine
    # Deleted without a recovery window, so the name is free again at once.
    assert resolve_secret(store_secret("quo/int-1/webhook", "again")) == "again"


def test_aws_names_are_checked_like_file_names(aws_sm: Any) -> None:
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        store_secret("../x", VALUE)
    assert aws_sm.list_secrets()["SecretList"] == []


class _FailingSecretsManager:
    """What AWS and botocore raise with the request quoted in their text."""

    def __init__(self, failure: Exception) -> None:
        self._failure = failure

    def __getattr__(self, operation: str) -> Any:
        def call(**params: Any) -> None:
            raise self._failure

        return call


@pytest.mark.parametrize(
    "failure",
    [
        ClientError(
            {"Error": {"Code": "InternalServiceError", "Message": f"cannot store {VALUE}"}},
            "CreateSecret",
        ),
        ParamValidationError(report=f"Invalid parameter SecretString, value: {VALUE}"),
    ],
)
def test_aws_failures_never_carry_the_value(
    aws_sm: Any, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    monkeypatch.setattr(boto3, "client", lambda service: _FailingSecretsManager(failure))
    for attempt in (
        lambda: store_secret("quo/int-1/webhook", VALUE),
        lambda: delete_secret("aws-sm:quo/int-1/webhook"),
    ):
        with pytest.raises(SecretWriteError) as raised:
            attempt()
        error = raised.value
        assert "'aws-sm:quo/int-1/webhook'" in str(error)
        assert VALUE not in str(error)
        # Nothing chained either: a logged traceback would print it.
        assert error.__cause__ is None and error.__context__ is None
