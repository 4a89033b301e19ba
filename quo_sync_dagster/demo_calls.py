"""`quo-sync demo --calls N`: Quo calls and messages between the workspace and the synced
people, logged on the CRM by the activity runs, then checked (activity_check.py).

The mix, in turn: answered calls with a recording, summary and transcript; answered calls with
a summary only; missed calls; voicemails; incoming and outgoing messages; outgoing calls whose
events carry no participants (the run asks Quo for the call); calls from a number nobody in the
CRM has. A third of the deliveries are duplicated and some are reordered by the sandbox."""

from __future__ import annotations

import random
from typing import Any

from quo_sync_dagster.local_stack import LocalStack

_UNKNOWN_PREFIX = "+1212555"  # 212-555-01xx: valid numbers the generated people do not use


def _kinds() -> list[tuple[str, dict[str, Any]]]:
    call, message = "call", "message"
    return [
        (call, {"recording": True, "summary": True, "transcript": True}),
        (call, {"summary": True, "duration": 42}),
        (call, {"outcome": "missed", "duration": 17}),
        (call, {"outcome": "voicemail"}),
        (message, {"direction": "incoming"}),
        (message, {"direction": "outgoing"}),
        (call, {"direction": "outgoing", "empty_participants": True}),
        (call, {"unknown": True}),
    ]


def simulate_calls(
    stack: LocalStack, integration_id: str, count: int, rng: random.Random
) -> dict[str, int]:
    """`count` calls and messages through the Quo sandbox; returns how many of each."""
    assert stack.store is not None
    numbers = sorted(
        {p for _, link in stack.store.iter_contact_links(integration_id) for p in link.phones}
    )
    if not numbers:
        raise RuntimeError(f"integration {integration_id!r} has no synced person with a phone")
    stack.quo.webhook_faults(duplicate_rate=0.33, reorder=min(count, 12))
    made: dict[str, int] = {}
    kinds = _kinds()
    for n in range(count):
        kind, options = kinds[n % len(kinds)]
        options = dict(options)
        number = rng.choice(numbers)
        if options.pop("unknown", False):
            number = f"{_UNKNOWN_PREFIX}{n % 100:04d}"
        if kind == "message":
            stack.quo.simulate_message(number, f"Demo message {n}", **options)
        else:
            stack.quo.simulate_call(number, **options)
        label = f"{kind}:{options.get('outcome') or options.get('direction') or 'answered'}"
        made[label] = made.get(label, 0) + 1
    return made


def calls_result(stack: LocalStack, integration_id: str, made: dict[str, int]) -> dict[str, Any]:
    """Waits for the activity runs, then the RESULT fields of the activity check."""
    assert stack.store is not None
    integration = stack.store.get_integration(integration_id)
    print("Waiting for the activity runs to log what Quo sent ...", flush=True)
    stack.wait_activities_logged(integration)
    check = stack.activity_check(integration)
    return {"quoObjects": made, **check.result()}
