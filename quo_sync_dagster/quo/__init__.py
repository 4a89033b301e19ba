"""Quo v1 API: the HTTP client, the shared rate governor and the idempotent contact upsert."""
