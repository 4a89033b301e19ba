"""The CRM person corpus (fixtures/crm_corpus: records shaped as each CRM's documentation shows
them, sources in its README) and the field-by-field check each connector's tests run on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from quo_sync_dagster.core.models import LabeledValue, QuoContact
from quo_sync_dagster.crms.base import CRMConnector

CORPUS = Path(__file__).with_name("fixtures") / "crm_corpus"
# (first, last, company, e-mails, phones), those two as (label, value) pairs; or the skip's
# exception (NoPhone, Excluded).
Expected = tuple[Any, ...] | type[Exception]


def corpus_records(crm: str) -> list[dict[str, Any]]:
    """The corpus entries of `crm`: {id, objectType, case, source, record, ...}."""
    return json.loads((CORPUS / f"{crm}.json").read_text())["records"]


def each_record(crm: str) -> pytest.MarkDecorator:
    """Parametrize a test's `entry` with every corpus entry of `crm`."""
    return pytest.mark.parametrize("entry", corpus_records(crm), ids=lambda entry: entry["id"])


def transform_as_expected(
    connector: CRMConnector, record: dict[str, Any], object_type: str, expected: Expected
) -> QuoContact | None:
    """The record's contact, checked field by field against `expected`; None when `expected`
    is the skip, which the transform must raise."""
    if isinstance(expected, type):
        with pytest.raises(expected):
            connector.transform_person_to_quo(record, object_type)
        return None
    contact = connector.transform_person_to_quo(record, object_type)
    first, last, company, addresses, numbers = expected
    assert (contact.first_name, contact.last_name, contact.company) == (first, last, company)
    assert contact.emails == tuple(LabeledValue(*e) for e in addresses)
    assert contact.phone_numbers == tuple(LabeledValue(*n) for n in numbers)
    return contact
