"""Every connector's transform on the CRM corpus (fixtures/crm_corpus: person records shaped as
each CRM's documentation shows them, awkward cases included, sources in its README).

What must hold: a record becomes a Quo contact or is skipped with a reason (NoPhone: no number
that can be one; Excluded: a marker the connector filters on), never failed; a contact holds
only E.164 numbers, all of them numbers the record holds, and a non-empty first name; every
record has a readable id.
"""

from __future__ import annotations

import json
import re
from typing import Any

import phonenumbers
import pytest

from quo_sync_dagster.core.models import Excluded, Integration, InvalidRecord, NoPhone
from quo_sync_dagster.crms import connector_class
from quo_sync_dagster_tests.corpus import CORPUS, corpus_records

OBJECT_TYPES = {"pipedrive": {"person": "Person"}}  # the corpus's name -> the connector's
E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def _entries() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.stem, entry)
        for path in sorted(CORPUS.glob("*.json"))
        for entry in corpus_records(path.stem)
    ]


def _digits_held(record: Any) -> set[str]:
    """The digits of every phone-like run the record holds, vanity letters read as digits
    (1-800-FLOWERS): a number the contact carries must come from one of them."""
    text = json.dumps(record, ensure_ascii=False)
    runs = re.findall(r"[0-9A-Za-z][0-9A-Za-z ().\-/]{5,}[0-9A-Za-z]", text)
    return {re.sub(r"\D", "", phonenumbers.convert_alpha_characters_in_number(r)) for r in runs}


@pytest.mark.parametrize(
    ("crm", "entry"), _entries(), ids=[f"{crm}-{e['id']}" for crm, e in _entries()]
)
def test_a_corpus_record_becomes_a_contact_or_a_reasoned_refusal(
    crm: str, entry: dict[str, Any]
) -> None:
    integration = Integration("corpus", crm, "env:UNUSED", settings={"base_url": "http://x"})
    connector = connector_class(crm)(integration, "token")
    object_type = OBJECT_TYPES.get(crm, {}).get(entry["objectType"], entry["objectType"])
    record = entry["record"]
    assert connector.record_key(record, object_type)
    try:
        contact = connector.transform_person_to_quo(record, object_type)
    except (NoPhone, Excluded) as skipped:
        assert str(skipped).strip(), entry["case"]
        return
    except InvalidRecord as refused:
        pytest.fail(f"{entry['case']}: failed: {refused}")
    finally:
        connector.close()
    assert contact.first_name and contact.first_name.strip(), entry["case"]
    held = _digits_held(record)
    for phone in contact.phone_numbers:
        assert E164.fullmatch(phone.value), (entry["case"], phone.value)
        national = str(phonenumbers.parse(phone.value).national_number)
        assert any(national in digits for digits in held), (entry["case"], phone.value)
