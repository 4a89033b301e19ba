"""The AWS code paths (Secrets Manager references, the S3 page-frame IO manager) against moto,
which serves both APIs in-process: no network, no real credentials."""

from __future__ import annotations

import pickle
from pathlib import Path

import boto3
import dagster as dg
import pandas as pd
import pytest

from quo_sync_dagster.core.models import Integration
from quo_sync_dagster.core.process import Process, ProcessState
from quo_sync_dagster.definitions import defs
from quo_sync_dagster.orchestration.factory import RANGE_END, RANGE_START
from quo_sync_dagster.orchestration.resources import PageFramesIOManager, StoreResource
from quo_sync_dagster.orchestration.sync import page_key
from quo_sync_dagster.secrets import MissingSecret, resolve_secret
from quo_sync_dagster.store import open_store

BUCKET = "quo-sync-frames"
PREFIX = "tests/page-frames"
ASSET = "scalingtest_crm_pages"
RECORDS, PAGE_SIZE = 250, 100  # pages of 100, 100 and 50 rows


# ---- secrets ----------------------------------------------------------------------------------


def test_aws_sm_ref_returns_the_stored_secret_string(aws: None) -> None:
    sm = boto3.client("secretsmanager")
    sm.create_secret(Name="quo/it-1/api-key", SecretString="k-1234-real")
    sm.create_secret(Name="quo/it-2/api-key", SecretString="k-5678-other")
    assert resolve_secret("aws-sm:quo/it-1/api-key") == "k-1234-real"
    assert resolve_secret("aws-sm:quo/it-2/api-key") == "k-5678-other"
    # A rotated secret resolves to its current version.
    sm.put_secret_value(SecretId="quo/it-1/api-key", SecretString="k-rotated")
    assert resolve_secret("aws-sm:quo/it-1/api-key") == "k-rotated"


def test_unreadable_aws_sm_secret_names_the_ref_and_no_secret_value(aws: None) -> None:
    sm = boto3.client("secretsmanager")
    sm.create_secret(Name="quo/present", SecretString="s3cr3t-value")
    with pytest.raises(MissingSecret) as caught:
        resolve_secret("aws-sm:quo/absent")
    text = str(caught.value)
    assert "aws-sm:quo/absent" in text
    assert "s3cr3t-value" not in text
    # A binary-only secret has no SecretString: named, not a bare KeyError.
    sm.create_secret(Name="quo/binary", SecretBinary=b"b1nary-value")
    with pytest.raises(MissingSecret) as caught:
        resolve_secret("aws-sm:quo/binary")
    assert "aws-sm:quo/binary" in str(caught.value)
    assert "b1nary-value" not in str(caught.value)


def test_env_ref_resolves_and_a_missing_variable_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUO_SYNC_TEST_SECRET", "env-value-42")
    assert resolve_secret("env:QUO_SYNC_TEST_SECRET") == "env-value-42"
    monkeypatch.delenv("QUO_SYNC_TEST_MISSING", raising=False)
    with pytest.raises(MissingSecret, match="QUO_SYNC_TEST_MISSING"):
        resolve_secret("env:QUO_SYNC_TEST_MISSING")
    monkeypatch.setenv("QUO_SYNC_TEST_EMPTY", "")  # set but empty is as good as missing
    with pytest.raises(MissingSecret, match="QUO_SYNC_TEST_EMPTY"):
        resolve_secret("env:QUO_SYNC_TEST_EMPTY")


@pytest.mark.parametrize("ref", ["vault:kv/quo", "plain-api-key", "env:", "aws-sm:"])
def test_unsupported_refs_are_named(ref: str) -> None:
    with pytest.raises(MissingSecret) as caught:
        resolve_secret(ref)
    assert repr(ref) in str(caught.value)


# ---- S3 page frames ---------------------------------------------------------------------------


def _process(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path}/s.sqlite"
    store = open_store(uri)
    try:
        store.upsert_integration(
            Integration(
                id="it",
                crm="scalingtest",
                quo_api_key_ref="env:X",
                quo_base_url="http://127.0.0.1:9",
                settings={"records": RECORDS},
            )
        )
        store.create_process(
            Process(
                id="proc-s3",
                integration_id="it",
                name="it-MockPerson-sync",
                type="CRM_SYNC",
                state=ProcessState.PROCESSING_BATCHES,
                context={
                    "crm": "scalingtest",
                    "personObjectType": "MockPerson",
                    "pageSize": PAGE_SIZE,
                    "sortDesc": True,
                    "modifiedSince": None,
                },
            )
        )
    finally:
        store.close()
    return uri, "proc-s3"


def _expected_ids(page: int) -> list[str]:
    # ScalingTest person i was last updated i minutes before the base time: newest first is i order.
    return [f"st-{i:07d}" for i in range(page * PAGE_SIZE, min((page + 1) * PAGE_SIZE, RECORDS))]


def test_ranged_run_writes_one_s3_object_per_page_and_reads_them_back(
    aws: None, tmp_path: Path
) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="elsewhere/untouched", Body=b"x")
    store_uri, process_id = _process(tmp_path)
    keys = [page_key(process_id, i) for i in range(3)]
    io_manager = PageFramesIOManager(s3_bucket=BUCKET, s3_prefix=PREFIX)

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("scalingtest_pages", keys)
        result = dg.materialize(
            [defs.get_assets_def(ASSET)],
            instance=instance,
            resources={"store": StoreResource(uri=store_uri), "page_frames": io_manager},
            tags={RANGE_START: keys[0], RANGE_END: keys[-1]},
        )
        assert result.success
        # One materialization per page of the range.
        materialized = result.asset_materializations_for_node(ASSET)
        assert sorted(m.partition for m in materialized) == keys

        # Exactly one object per partition under the prefix, nothing else written there.
        listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
        written = sorted(o["Key"] for o in listing.get("Contents", []))
        assert written == [f"{PREFIX}/{ASSET}/{k}" for k in keys]
        for i, key in enumerate(keys):
            body = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{ASSET}/{key}")["Body"].read()
            frame = pickle.loads(body)
            assert isinstance(frame, pd.DataFrame)
            assert len(frame) == (50 if i == 2 else 100)
            assert frame["id"].tolist() == _expected_ids(i)
            assert {"first_name", "phones", "updated_at"} <= set(frame.columns)

        # A downstream step reads the frames back through the same IO manager.
        # Closed after use: an open context leaves its instance current for later tests.
        with (
            dg.build_init_resource_context(instance=instance) as init_context,
            dg.build_input_context(
                asset_key=dg.AssetKey(ASSET),
                asset_partitions_def=dg.DynamicPartitionsDefinition(name="scalingtest_pages"),
                asset_partition_key_range=dg.PartitionKeyRange(keys[1], keys[2]),
                dagster_type=dg.DagsterType(lambda _, __: True, name="frames"),
                instance=instance,
            ) as context,
        ):
            loaded = io_manager.create_io_manager(init_context).load_input(context)
        assert set(loaded) == {keys[1], keys[2]}
        assert [len(loaded[k]) for k in keys[1:]] == [100, 50]
        assert loaded[keys[2]]["id"].tolist() == _expected_ids(2)
