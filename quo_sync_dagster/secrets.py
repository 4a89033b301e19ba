"""Credentials are stored as references and resolved only where a request is made.

References: `env:NAME` (an environment variable), `file:PATH` (a file; a relative PATH is under
the secrets directory) and `aws-sm:SECRET_ID` (AWS Secrets Manager). Secrets the product creates
itself (webhook signing secrets, say) are written by `store_secret`: to a 0600 file in the
secrets directory, or to Secrets Manager when `QUO_SYNC_SECRET_BACKEND=aws-sm`. No error message
ever holds a secret value.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

BACKEND_ENV = "QUO_SYNC_SECRET_BACKEND"  # "file" (the default) or "aws-sm"
SECRETS_DIR_ENV = "QUO_SYNC_SECRETS_DIR"
_MAX_FILE_NAME_BYTES = 255  # NAME_MAX of common file systems
_FILE_NAME_SAFE = re.compile(r"[A-Za-z0-9_.-]")


class MissingSecret(LookupError):
    pass


class SecretWriteError(RuntimeError):
    """store_secret or delete_secret failed; the message names the reference, never a value."""


def resolve_secret(ref: str) -> str:
    """The secret `ref` points to. Errors name the reference, never a value."""
    scheme, _, name = ref.partition(":")
    if scheme == "env" and name:
        value = os.environ.get(name)
        if not value:
            raise MissingSecret(f"environment variable {name!r} (from {ref!r}) is not set")
        return value
    if scheme == "file" and name:
        try:
            # A text file's final newline is no part of the secret (store_secret adds one too).
            value = _secret_path(name).read_bytes().decode().removesuffix("\n")
        except FileNotFoundError:
            raise MissingSecret(f"secret file {ref!r} does not exist") from None
        except (OSError, UnicodeError) as exc:  # only the kind: a decode error quotes the content
            raise MissingSecret(f"cannot read secret file {ref!r}: {type(exc).__name__}") from None
        if not value:
            raise MissingSecret(f"secret file {ref!r} is empty")
        return value
    if scheme == "aws-sm" and name:
        import boto3  # only deployments that use Secrets Manager pay for the import
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = boto3.client("secretsmanager").get_secret_value(SecretId=name)
        except (BotoCoreError, ClientError) as exc:  # AWS's text names no secret value
            raise MissingSecret(f"cannot read {ref!r} from AWS Secrets Manager: {exc}") from exc
        if "SecretString" not in response:
            raise MissingSecret(f"{ref!r} has no SecretString (binary secrets are not supported)")
        return response["SecretString"]
    raise MissingSecret(
        f"unsupported secret reference {ref!r}: use env:NAME, file:PATH or aws-sm:SECRET_ID"
    )


def store_secret(name: str, value: str) -> str:
    """Write `value` under `name` (replacing an earlier value) and return its reference.

    `name` is a path-like label such as "attio/int-1/webhook"; ".." parts, absolute names and
    control characters are refused with a ValueError naming it."""
    _check_name(name)
    if not value:
        raise ValueError(f"the value of secret {name!r} is empty")
    backend = os.environ.get(BACKEND_ENV) or "file"
    if backend == "file":
        return _store_file(name, value)
    if backend == "aws-sm":
        return _store_aws(name, value)
    raise ValueError(f"unsupported {BACKEND_ENV}={backend!r}: use file or aws-sm")


def delete_secret(ref: str) -> None:
    """Delete a secret `store_secret` wrote; deleting one that is already gone is fine. Other
    references (env:, files outside the secrets directory) are refused with a ValueError."""
    scheme, _, name = ref.partition(":")
    if scheme == "file" and name:
        path = _secret_path(name)
        if path.parent.resolve() != secrets_dir().resolve():
            raise ValueError(f"{ref!r} is outside the secrets directory: not deleted")
        path.unlink(missing_ok=True)
        return
    if scheme == "aws-sm" and name:
        # Without a recovery window, so the name can be stored again at once.
        _call_aws(
            ref,
            "delete_secret",
            "ResourceNotFoundException",
            SecretId=name,
            ForceDeleteWithoutRecovery=True,
        )
        return
    raise ValueError(f"cannot delete secret reference {ref!r}: only file: and aws-sm: ones")


def secrets_dir() -> Path:
    """$QUO_SYNC_SECRETS_DIR, else $DAGSTER_HOME/secrets, else ~/.quo_sync/secrets (absolute:
    a reference stays valid from another working directory)."""
    if configured := os.environ.get(SECRETS_DIR_ENV):
        directory = Path(configured)
    elif dagster_home := os.environ.get("DAGSTER_HOME"):
        directory = Path(dagster_home) / "secrets"
    else:
        directory = Path.home() / ".quo_sync" / "secrets"
    return directory.expanduser().absolute()


def _secret_path(name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else secrets_dir() / path


def _check_name(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if (
        not name
        or name.startswith("/")
        or any(part in (".", "..") for part in parts)
        or any(ord(char) < 32 or ord(char) == 127 for char in name)
    ):
        raise ValueError(
            f"secret name {name!r} is not allowed: it must be non-empty and relative, without "
            "'.' or '..' parts or control characters"
        )


def _file_name(name: str) -> str:
    # Injective, so two names never share a file: "%" itself is escaped too.
    return "".join(
        char if _FILE_NAME_SAFE.fullmatch(char) else "".join(f"%{b:02X}" for b in char.encode())
        for char in name
    )


def _store_file(name: str, value: str) -> str:
    file_name = _file_name(name)
    if len(file_name.encode()) > _MAX_FILE_NAME_BYTES:
        raise ValueError(f"secret name {name!r} is too long for a file name")
    directory = secrets_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)  # also when it existed with a looser mode
    path = directory / file_name
    # mkstemp creates the file 0600; os.replace swaps it in whole, so a reader never sees a
    # partly written secret.
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(f"{value}\n".encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)  # the rename itself survives a crash
    finally:
        os.close(directory_fd)
    return f"file:{path}"


def _store_aws(name: str, value: str) -> str:
    ref = f"aws-sm:{name}"
    created = _call_aws(
        ref, "create_secret", "ResourceExistsException", Name=name, SecretString=value
    )
    if not created:
        _call_aws(ref, "put_secret_value", None, SecretId=name, SecretString=value)
    return ref


def _call_aws(ref: str, operation: str, tolerated: str | None, **params: Any) -> bool:
    """Call Secrets Manager: True when done, False when AWS answered the `tolerated` error code.

    Other failures raise SecretWriteError with AWS's error code only: the error text (and, for
    bad parameters, botocore's) can quote the request, and the request holds the secret."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        getattr(boto3.client("secretsmanager"), operation)(**params)
        return True
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "ClientError"))
    except BotoCoreError as exc:
        code = type(exc).__name__
    if code == tolerated:
        return False
    # Raised outside the except block, so no chained exception carries the request either.
    raise SecretWriteError(f"AWS Secrets Manager {operation} failed for {ref!r}: {code}")
