"""The connector contract every CRM implements: its CRMConfig and the seed's five methods.

A connector module defines one subclass with a unique `name`; subclassing registers it, and the
orchestration factory turns every registered connector into its Dagster jobs, assets and sensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from quo_sync_dagster.core.models import (
    CallActivity,
    Integration,
    PersonPage,
    QuoContact,
    SmsActivity,
)
from quo_sync_dagster.core.phones import PhoneRules
from quo_sync_dagster.core.ratelimit import Throttle
from quo_sync_dagster.crms.fields import crm_id


class PersonObjectType(BaseModel):
    crm_object_name: str  # e.g. "Contact", "Lead"; one sync Process each
    quo_contact_type: str = "contact"
    # Synced by an integration whose `object_types` setting does not name its types (off:
    # only when named there or in an initial sync's launchpad config).
    default: bool = True


class SyncConfig(BaseModel):
    reverse_chronological: bool = True  # newest first, so recent people land in Quo first
    # The API can only list oldest first (e.g. ascending ids, no sort): the page sensor then
    # launches the last pages' runs first, so the newest people still reach Quo first.
    lists_oldest_first: bool = False
    initial_batch_size: int = Field(100, ge=1)  # records per page in an initial sync
    ongoing_batch_size: int = Field(50, ge=1)
    supports_webhooks: bool = False
    # The list can be filtered by modification time; without it every poll is a full scan
    # (whose unchanged people cost no Quo request) and deletions are found by sweeping.
    supports_modified_since: bool = True
    poll_interval_minutes: int = Field(60, ge=1)


class QueueConfig(BaseModel):
    """The seed's queueConfig, mapped onto Dagster: workers are concurrent runs of this CRM,
    batchSize is pages per ranged run, timeout is the run's maximum runtime."""

    max_workers: int = Field(5, ge=1)
    batch_size: int = Field(10, ge=1)
    timeout: int = Field(600, ge=1)


class CRMConfig(BaseModel):
    person_object_types: list[PersonObjectType] = Field(min_length=1)
    sync_config: SyncConfig = SyncConfig()
    queue_config: QueueConfig = QueueConfig()
    # Requests/s the CRM allows per credential: one governor, shared by every run through the
    # store, keeps all users of that credential under it. None: no shared limit.
    requests_per_second: float | None = Field(None, gt=0)


_REGISTRY: dict[str, type[CRMConnector]] = {}


class CRMConnector(ABC):
    name: ClassVar[str]  # registry key, Dagster name prefix and `quo-sync demo --crm` value
    quo_source: ClassVar[str]  # the `source` of every Quo contact this connector writes
    crm_config: ClassVar[CRMConfig]
    # Module of the CRM's local simulator in sandbox/, run by `quo-sync demo` and the tests as
    # `python -m MODULE --data-dir D --port 0 --records N --token T`; it prints
    # `SANDBOX_READY <url>`, which becomes the integration's `base_url` setting. None: the
    # connector needs no server (ScalingTest).
    simulator: ClassVar[str | None] = None
    # How `fetch_person_page` pages once sorted oldest first (sort_desc=False): "keyset" (a
    # cursor names the last person seen, so concurrent changes cannot make a walk skip anyone
    # else) or "offset" (positions: a person deleted before the current page moves everyone
    # after it one place back). The closing pass of a full scan walks accordingly (closing.py).
    stable_paging: ClassVar[Literal["keyset", "offset"]] = "keyset"
    max_ids_per_fetch: ClassVar[int] = 100  # ids per fetch_persons_by_ids call
    max_offset: ClassVar[int | None] = None  # records an offset can reach (None: no limit)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in _REGISTRY:
            raise TypeError(f"two connectors are named {cls.name!r}")
        _REGISTRY[cls.name] = cls

    def __init__(
        self,
        integration: Integration,
        credential: str | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        """`credential` is the resolved `integration.crm_credential_ref` (never stored or
        logged); `throttle` the shared governor for it (see CRMConfig.requests_per_second)."""
        self.integration = integration
        self.credential = credential
        self.throttle = throttle
        # Read once: a bad setting fails the run that opens the integration, naming the setting.
        self.phone_rules = PhoneRules.from_settings(
            integration.default_region, integration.settings
        )

    # ---- the five methods of the seed -----------------------------------------------------
    @abstractmethod
    def fetch_person_page(
        self,
        object_type: str,
        page: int,
        limit: int,
        modified_since: datetime | None = None,
        sort_desc: bool = True,
        cursor: str | None = None,
    ) -> PersonPage:
        """Page `page` (0-based) of `limit` people.

        A CRM that reports a `total` must serve any page by its index: its pages are fetched in
        parallel. Otherwise the planner walks the pages once, passing each page's
        `next_cursor` as `cursor` of the next (None for page 0), and later fetches page k with
        the cursor it noted for k (so an offset-paged CRM may ignore `cursor`)."""

    @abstractmethod
    def transform_person_to_quo(self, person: dict[str, Any], object_type: str) -> QuoContact:
        """Raise core.models.InvalidRecord naming the bad field for a person Quo cannot take."""

    @abstractmethod
    def log_sms_to_activity(self, activity: SmsActivity) -> str:
        """Write the SMS on the CRM record; return the CRM activity id."""

    @abstractmethod
    def log_call_to_activity(self, activity: CallActivity) -> str:
        """Write the call on the CRM record; return the CRM activity id."""

    def create_person_for_caller(self, number: str) -> str | None:
        """Create a person holding the E.164 `number` (a caller nobody in the CRM has) and
        return its record key; None where the CRM's API does not let us create people."""
        return None

    @abstractmethod
    def update_call_activity(self, activity_id: str, activity: CallActivity) -> str:
        """Rewrite the activity `activity_id` (made by log_call_to_activity) with what Quo has
        sent about the call since (outcome, recording, summary, transcript, voicemail); return
        its id afterwards: the same, or a new one where the CRM can only replace it."""

    @abstractmethod
    def setup_webhooks(self, receiver_url: str) -> dict[str, Any]:
        """Subscribe the CRM's person events to `receiver_url`; return what teardown needs."""

    @classmethod
    def object_types_for(cls, settings: dict[str, Any]) -> list[str]:
        """The object types an integration with `settings` syncs (initial syncs without a
        list of their own, polling, webhooks, deletes): its `object_types` setting, else the
        types that are on by default. ValueError names a type the CRM does not have."""
        known = [o.crm_object_name for o in cls.crm_config.person_object_types]
        named = settings.get("object_types")
        if named is None:
            return [o.crm_object_name for o in cls.crm_config.person_object_types if o.default]
        if not isinstance(named, list) or not named or set(named) - set(known):
            raise ValueError(
                f"setting object_types must be a non-empty list of {known}, not {named!r}"
            )
        return named

    @property
    def object_types(self) -> list[str]:
        return self.object_types_for(self.integration.settings)

    # ---- optional -------------------------------------------------------------------------
    def prepare_page(self, records: Sequence[dict[str, Any]], object_type: str) -> None:
        """Read what the page's transforms need from elsewhere in the CRM in one go (e.g. the
        names of the organizations its people belong to), before transform_person_to_quo is
        called on each record. A failure here is the CRM's, so it fails the page."""

    def person_id(self, person: dict[str, Any]) -> str:
        """How errors name a CRM person: its id as people see it in the CRM."""
        return str(person.get("id"))

    def record_key(self, record: dict[str, Any], object_type: str) -> str:
        """The CRM id a record's Quo externalId holds (before namespacing); InvalidRecord if
        the record has no usable id. transform_person_to_quo uses it, so both agree."""
        return crm_id(record.get("id"), "id")

    def change_key(self, object_type: str, person_id: str) -> str:
        """The same, for the id of a person a webhook reports."""
        return person_id

    @classmethod
    def earlier_key(cls, key: str) -> str:
        """The CRM id the earlier production sync wrote as externalId for the record key `key`
        (what an integration's `legacy_external_id` template is filled with at cutover)."""
        return key

    def fetch_persons_by_ids(self, object_type: str, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The people among `ids` (CRM ids, as in their externalIds) that the CRM has now;
        ids it no longer has (deleted, merged away) are left out, never an error. At most
        `max_ids_per_fetch` ids per call."""
        raise NotImplementedError(f"{self.name} cannot fetch people by id")

    def teardown_webhooks(self, subscription: dict[str, Any]) -> None:
        """Remove what setup_webhooks created; CRMs without webhooks have nothing to remove."""

    # ---- the CRM's API client, built on first use ------------------------------------------
    def make_api(self) -> Any:
        """Build the CRM's API client (typically from `self.integration.settings["base_url"]`,
        `self.credential` and `throttle=self.throttle`); `api` calls it once, when first used.
        Connectors without a client (ScalingTest) leave it alone."""
        raise NotImplementedError(f"{self.name} has no API client")

    @cached_property
    def api(self) -> Any:
        return self.make_api()

    def close(self) -> None:
        """Release HTTP clients: the API client, if it was built."""
        if "api" in self.__dict__:
            self.__dict__.pop("api").close()


def connector_class(name: str) -> type[CRMConnector]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no CRM connector named {name!r}; known: {sorted(_REGISTRY)}") from None


def registered_connectors() -> dict[str, type[CRMConnector]]:
    return dict(_REGISTRY)
