"""The AWS inbox: the receiver sends verified changes to SQS, `drain_sqs` moves them into the
store's inbox (for deployments where the receiver runs apart from Dagster and its store).

A message body is `{"integrationId", "eventId", "payload"}`. On a FIFO queue (`.fifo`) the group
is the integration and the deduplication id a hash of integration and event id (SQS allows 128
characters), so SQS drops a retried delivery within its 5-minute window; the store's inbox
dedupes the rest. A message is deleted only after the store holds it: at-least-once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from quo_sync_dagster.store import Store
from quo_sync_dagster.webhooks.inbox import InboxEntry

log = logging.getLogger(__name__)

SQS_BATCH = 10  # SendMessageBatch / ReceiveMessage / DeleteMessageBatch maximum


class SqsInboxError(RuntimeError):
    """SQS refused some entries; the message names SQS's codes, never a payload."""


def _client(client: Any) -> Any:
    if client is not None:
        return client
    import boto3  # only AWS deployments pay for the import

    return boto3.client("sqs")


class SqsInbox:
    def __init__(self, queue_url: str, client: Any = None) -> None:
        self.queue_url = queue_url
        self.fifo = queue_url.endswith(".fifo")
        self._sqs = _client(client)

    def _message(self, index: int, entry: InboxEntry) -> dict[str, Any]:
        body = {"integrationId": entry.integration_id, "eventId": entry.event_id}
        message = {"Id": str(index), "MessageBody": json.dumps({**body, "payload": entry.payload})}
        if self.fifo:
            key = f"{entry.integration_id}\n{entry.event_id}".encode()
            message["MessageGroupId"] = entry.integration_id
            message["MessageDeduplicationId"] = hashlib.sha256(key).hexdigest()
        return message

    def enqueue(self, entries: Sequence[InboxEntry]) -> list[bool]:
        """SQS cannot say whether a message was a duplicate: every entry answers True."""
        for start in range(0, len(entries), SQS_BATCH):
            chunk = entries[start : start + SQS_BATCH]
            answer = self._sqs.send_message_batch(
                QueueUrl=self.queue_url,
                Entries=[self._message(i, e) for i, e in enumerate(chunk)],
            )
            if failed := answer.get("Failed"):
                codes = sorted({f.get("Code", "?") for f in failed})
                raise SqsInboxError(f"SQS refused {len(failed)} of {len(chunk)} messages: {codes}")
        return [True] * len(entries)

    def close(self) -> None:
        self._sqs.close()


def drain_sqs(
    queue_url: str,
    store: Store,
    client: Any = None,
    wait_seconds: int = 0,
    max_messages: int | None = None,
) -> int:
    """Move messages into the store's inbox until the queue answers empty (or `max_messages`
    were read); return how many were moved (duplicates included). A message that is not ours
    is left in the queue, for its redrive policy to move to a dead-letter queue."""
    sqs = _client(client)
    read = moved = 0
    while max_messages is None or read < max_messages:
        want = SQS_BATCH if max_messages is None else min(SQS_BATCH, max_messages - read)
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=want, WaitTimeSeconds=wait_seconds
        ).get("Messages", [])
        if not messages:
            break
        read += len(messages)
        stored = [m for m in messages if _store(store, m)]
        if stored:
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(stored)
            ]
            answer = sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            if failed := answer.get("Failed"):  # they come back, and the store dedupes them
                log.warning("SQS did not delete %d drained messages", len(failed))
        moved += len(stored)
    return moved


def _store(store: Store, message: dict[str, Any]) -> bool:
    try:
        body = json.loads(message["Body"])
        integration_id, event_id, payload = body["integrationId"], body["eventId"], body["payload"]
        if not (isinstance(integration_id, str) and isinstance(event_id, str)):
            raise TypeError("ids are not strings")
        if not isinstance(payload, dict):
            raise TypeError("payload is not an object")
    except (ValueError, KeyError, TypeError):
        log.warning("SQS message %s is not an inbox entry: left in the queue", message["MessageId"])
        return False
    store.enqueue_webhook(integration_id, event_id, payload)
    return True
