"""Credentials are stored as references and resolved only where a request is made."""

from __future__ import annotations

import os


class MissingSecret(LookupError):
    pass


def resolve_secret(ref: str) -> str:
    """`env:NAME` reads an environment variable; `aws-sm:SECRET_ID` reads AWS Secrets Manager.

    Errors name the reference, never a value.
    """
    scheme, _, name = ref.partition(":")
    if scheme == "env" and name:
        value = os.environ.get(name)
        if not value:
            raise MissingSecret(f"environment variable {name!r} (from {ref!r}) is not set")
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
    raise MissingSecret(f"unsupported secret reference {ref!r}: use env:NAME or aws-sm:SECRET_ID")
