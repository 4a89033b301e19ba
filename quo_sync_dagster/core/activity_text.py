"""How a Quo call or message reads on a CRM record, shared by every connector: a subject line and
the body's lines (plain text; a connector whose CRM takes HTML escapes each line). A later
version of the same call (its recording, summary, transcript or voicemail arrived) renders the
whole activity again, so an update replaces the body rather than appending to it."""

from __future__ import annotations

from quo_sync_dagster.core.models import CallActivity, CallOutcome, SmsActivity

MAX_TRANSCRIPT_CHARS = 20_000  # CRM text fields are bounded; the deep link has the rest


def call_subject(call: CallActivity) -> str:
    way = "Incoming" if call.direction == "incoming" else "Outgoing"
    what = {
        CallOutcome.ANSWERED: "call",
        CallOutcome.MISSED: "call (missed)",
        CallOutcome.VOICEMAIL: "call (missed, voicemail)",
        CallOutcome.RINGING: "call (ringing)",
    }[call.outcome]
    return f"{way} {what} (Quo)"


def call_lines(call: CallActivity) -> list[str]:
    """The body, one line per fact, in a fixed order; absent facts are left out."""
    lines = [call_subject(call)]
    if call.outcome is CallOutcome.ANSWERED:
        lines.append(f"Duration: {_duration(call.duration_seconds)}")
    parties = [f"Quo number: {call.quo_number}"] if call.quo_number else []
    parties += [f"Other party: {call.external_number}"] if call.external_number else []
    lines += parties
    if call.quo_user:
        lines.append(f"Quo user: {call.quo_user}")
    if call.summary:
        lines.append(f"Summary: {call.summary}")
    lines += [f"Next step: {step}" for step in call.next_steps]
    lines += [f"Recording: {url}" for url in call.recording_urls]
    if call.voicemail_url:
        lines.append(f"Voicemail: {call.voicemail_url}")
    if call.voicemail_transcript:
        lines.append(f"Voicemail transcript: {call.voicemail_transcript}")
    if call.transcript:
        text = call.transcript
        if len(text) > MAX_TRANSCRIPT_CHARS:
            text = text[:MAX_TRANSCRIPT_CHARS] + " [cut: the full transcript is in Quo]"
        lines.append(f"Transcript:\n{text}")
    if call.deep_link:
        lines.append(f"Open in Quo: {call.deep_link}")
    lines.append(f"Quo call id: {call.quo_call_id}")
    return lines


def sms_subject(sms: SmsActivity) -> str:
    return "Incoming SMS (Quo)" if sms.direction == "incoming" else "Outgoing SMS (Quo)"


def sms_lines(sms: SmsActivity) -> list[str]:
    lines = [sms_subject(sms), sms.content or "(no text)"]
    if sms.quo_number:
        lines.append(f"Quo number: {sms.quo_number}")
    if sms.external_number:
        lines.append(f"Other party: {sms.external_number}")
    if sms.deep_link:
        lines.append(f"Open in Quo: {sms.deep_link}")
    lines.append(f"Quo message id: {sms.quo_message_id}")
    return lines


def _duration(seconds: int) -> str:
    minutes, rest = divmod(max(seconds, 0), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
