"""CRM webhooks in: per-CRM handlers (`crms/<crm>_webhooks.py`) verify a delivery and turn it
into PersonChanges; the receiver (`webhooks.app`) stores them in the inbox before answering.

Kept free of imports: the CRM handler modules import `webhooks.handler` while `crms` loads.
"""
