"""Operational constants that are not settings: one documented place (like rq's ``defaults.py``).

They size Redis data that every deployment treats alike; a value that an operator should tune
belongs in :mod:`fallwatch.settings` instead.
"""

from __future__ import annotations

DEAD_LETTER_MAXLEN = 100_000
"""Approximate MAXLEN of the dead-letter stream (XADD ... MAXLEN ~)."""

FINAL_MAXLEN = 100_000
"""Approximate MAXLEN of the final-verdict stream."""

PENDING_TTL_S = 7 * 86400
"""TTL of an edge verdict parked while its cloud verdict is awaited: a safety net, since the
deadline sweep removes it long before."""

JOB_RESULT_TTL_S = 300
"""How long RQ keeps a finished offload job's result."""

JOB_FAILURE_TTL_S = 86400
"""How long RQ keeps a failed offload job (for ``rq info`` and post-mortems)."""

JOB_TTL_MARGIN_S = 60
"""An offload job waiting in the queue expires this long after the cloud deadline has passed."""

EVENT_TTL_S = 30 * 86400
"""TTL of an alert event's hash, renewed on every change (the alerts stream keeps the history)."""

DELIVERED_TTL_S = 30 * 86400
"""TTL of the marker that a notification of an event went out on a channel (exactly once)."""

STATUS_STREAM_MAXLEN = 10_000
"""Approximate MAXLEN of the camera-status stream."""
