"""Dagster resources: the store, the Quo API (client + shared governor, its QuoSettings from the
environment) and the page IO manager."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.storage.fs_io_manager import PickledObjectFilesystemIOManager
from dagster._core.storage.upath_io_manager import UPathIOManager

from quo_sync_dagster.core.adoption import Adoption
from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.crms import registered_connectors
from quo_sync_dagster.quo.client import QuoClient
from quo_sync_dagster.quo.governor import RateGovernor
from quo_sync_dagster.quo.upsert import ContactUpserter
from quo_sync_dagster.secrets import resolve_secret
from quo_sync_dagster.store import Store, open_store


def default_store_uri(dagster_home: str | None = None) -> str:
    """QUO_SYNC_STORE_URI, else SQLite under the Dagster home (shared by every run and sensor)."""
    if uri := os.environ.get("QUO_SYNC_STORE_URI"):
        return uri
    home = dagster_home or os.environ.get("DAGSTER_HOME") or ".quo-sync-home/dagster"
    return f"sqlite:///{Path(home, 'quo_sync.sqlite').resolve()}"


@functools.cache
def _open(uri: str) -> Store:
    # One store per process: sensors tick every few seconds and should not reconnect each time.
    return open_store(uri)


class StoreResource(dg.ConfigurableResource):
    """The process/map store. Leave `uri` empty for the embedded default."""

    uri: str | None = None

    def get(self) -> Store:
        return _open(self.uri or default_store_uri())


QUO_RATE_SETTING = "quo_requests_per_second"


def _env_number(environ: Mapping[str, str], name: str, default: float, kind: type) -> Any:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        what = "a whole number >= 1" if kind is int else "a number > 0"
        raise ValueError(f"{name}={raw!r} must be {what}")
    return value


@dataclass(frozen=True)
class QuoSettings:
    """How runs use the Quo API: the same for every run of a deployment, so not run config.
    From the environment of the instance's processes (`from_env`); the defaults are Quo's."""

    requests_per_second: float = 10.0  # Quo's documented limit per API key (QUO_SYNC_QUO_RATE)
    # Requests in flight per page step; the governor still paces them (QUO_SYNC_QUO_CONCURRENCY).
    concurrency: int = 4
    timeout_seconds: float = 30.0  # QUO_SYNC_QUO_TIMEOUT
    max_attempts: int = 6  # per request, on 5xx, timeouts and 429s (QUO_SYNC_QUO_MAX_ATTEMPTS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> QuoSettings:
        """The settings `environ` (default: this process's environment) sets; unset or empty
        variables keep the defaults. A bad value is a ValueError naming the variable."""
        env = os.environ if environ is None else environ
        return cls(
            requests_per_second=_env_number(
                env, "QUO_SYNC_QUO_RATE", cls.requests_per_second, float
            ),
            concurrency=_env_number(env, "QUO_SYNC_QUO_CONCURRENCY", cls.concurrency, int),
            timeout_seconds=_env_number(env, "QUO_SYNC_QUO_TIMEOUT", cls.timeout_seconds, float),
            max_attempts=_env_number(env, "QUO_SYNC_QUO_MAX_ATTEMPTS", cls.max_attempts, int),
        )

    def rate_for(self, integration: Integration) -> float:
        """Requests per second for the integration: its `quo_requests_per_second` setting may
        lower the deployment's rate, never raise it."""
        own = quo_rate_setting(integration.settings)
        return self.requests_per_second if own is None else min(own, self.requests_per_second)


def quo_rate_setting(settings: Mapping[str, Any]) -> float | None:
    """The integration's `quo_requests_per_second` (None: not set); ValueError when it is not a
    number > 0."""
    raw = settings.get(QUO_RATE_SETTING)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw < math.inf:
        raise ValueError(f"setting {QUO_RATE_SETTING} {raw!r} must be a number > 0")
    return float(raw)


class QuoResource(dg.ConfigurableResource):
    """Quo API access. No config: the key comes from the integration's secret reference, the
    rate, concurrency, timeout and attempts from QuoSettings (the environment), at run time."""

    def client(
        self, integration: Integration, store: Store, settings: QuoSettings | None = None
    ) -> QuoClient:
        """The integration's client; a bad setting or variable is a ValueError naming it."""
        settings = settings or QuoSettings.from_env()
        rate = settings.rate_for(integration)
        api_key = resolve_secret(integration.quo_api_key_ref)
        return QuoClient(
            integration.quo_base_url,
            api_key,
            governor=RateGovernor(store, api_key, rate),
            timeout_seconds=settings.timeout_seconds,
            max_attempts=settings.max_attempts,
        )

    def upserter(
        self,
        client: QuoClient,
        integration: Integration,
        store: Store,
        settings: QuoSettings | None = None,
    ) -> ContactUpserter:
        """The integration's upserter, with its adoption settings (core/adoption.py); a bad
        setting is a ValueError naming it."""
        concurrency = (settings or QuoSettings.from_env()).concurrency
        sources = (connector.quo_source for connector in registered_connectors().values())
        earlier_key = registered_connectors()[integration.crm].earlier_key
        adoption = Adoption.of(integration, sources, earlier_key)
        return ContactUpserter(client, store, integration.id, concurrency, adoption=adoption)


class _RangedFrames(UPathIOManager):
    """One pickled page DataFrame per partition, including the outputs of ranged runs (a dict
    of partition key -> frame), which Dagster's stock pickling IO managers refuse."""

    def handle_output(self, context: dg.OutputContext, obj: dict[str, Any]) -> None:
        paths = self._get_paths_for_partitions(context)
        missing = set(paths) - set(obj)
        if missing:
            raise ValueError(f"no frame for partitions {sorted(missing)}")
        for key, path in paths.items():
            self.make_directory(path.parent)
            self.dump_to_path(context, obj[key], path)
        context.add_output_metadata({"partitions": len(paths)})

    def load_input(self, context: dg.InputContext) -> dict[str, Any]:
        keys = context.asset_partition_keys
        loaded = self.load_partitions(context)  # one partition: the frame itself, not a dict
        return {keys[0]: loaded} if len(keys) == 1 else loaded


class _LocalFrames(_RangedFrames, PickledObjectFilesystemIOManager):
    pass


class PageFramesIOManager(dg.ConfigurableIOManagerFactory):
    """Local files under the Dagster storage directory by default; S3 (dagster-aws) when
    `s3_bucket` is set, as a deployment with one container per run needs."""

    s3_bucket: str | None = None
    s3_prefix: str = "quo-sync/page-frames"

    def create_io_manager(self, context: dg.InitResourceContext) -> UPathIOManager:
        if self.s3_bucket:
            # Imported here: dagster-aws costs ~0.6 s of import in every run that does not use it.
            from dagster_aws.s3 import S3Resource
            from dagster_aws.s3.io_manager import PickledObjectS3IOManager

            class _S3Frames(_RangedFrames, PickledObjectS3IOManager):
                pass

            return _S3Frames(self.s3_bucket, S3Resource().get_client(), self.s3_prefix)
        return _LocalFrames(os.path.join(context.instance.storage_directory(), "page_frames"))
