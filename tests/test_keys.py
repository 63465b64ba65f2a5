import pytest

from fallwatch.keys import Keys


def test_key_formats_are_pinned() -> None:
    k = Keys("fw")
    assert k.frames_stream() == "fw:stream:frames"
    assert k.verdicts_stream() == "fw:stream:verdicts"
    assert k.final_stream() == "fw:stream:final"
    assert k.alerts_stream() == "fw:stream:alerts"
    assert k.camera_status_stream() == "fw:stream:camera-status"
    assert k.dead_letter_stream() == "fw:stream:dead-letter"
    assert k.notify_outbox_stream() == "fw:stream:notify-outbox"
    assert k.alerts_channel() == "fw:channel:alerts"
    assert k.pixels("cam1:42") == "fw:pixels:cam1:42"
    assert k.pending_verdicts() == "fw:pending"
    assert k.pending_edge("cam1:42") == "fw:pending:cam1:42"
    assert k.final_done("cam1:42") == "fw:final:cam1:42"
    assert k.camera_state("cam1") == "fw:camera:cam1:state"
    assert k.camera_info("cam1") == "fw:camera:cam1:info"
    assert k.event("abc") == "fw:event:abc"
    assert k.delivered("abc", "ch0") == "fw:delivered:abc:ch0"
    assert k.stats() == "fw:stats"
    assert k.heartbeat("edge", "host-1") == "fw:heartbeat:edge:host-1"
    assert k.heartbeat_pattern() == "fw:heartbeat:*:*"
    assert k.counter("frames_dropped") == "fw:count:frames_dropped"
    assert k.cloud_queue() == "fw-cloud"
    assert (k.edge_group(), k.alerts_group()) == ("edge", "alerts")
    assert (k.mqtt_group(), k.mqtt_state(), k.mqtt_cameras()) == ("mqtt", "fw:mqtt:state", "fw:mqtt:cameras")
    assert k.mqtt_event("abc") == "fw:mqtt:event:abc"
    assert k.mqtt_lease() == "fw:mqtt:lease"


def test_default_prefix() -> None:
    assert Keys().frames_stream() == "fallwatch:stream:frames"


def test_budget_key_formats_are_pinned() -> None:
    k = Keys("fw")
    assert k.offload_queues() == ["fw-cloud", "fw-cloud-r1"]  # priority order: rank 0 keeps the old queue name
    assert k.budget_bucket() == "fw:budget:bucket"
    assert k.cloud_service() == "fw:cloud:service"
def test_typed_counters_keep_the_counter_formats() -> None:
    k = Keys("fw")
    assert k.camera_counter("cam1", "items") == "fw:count:ingest:cam1:items"
    assert k.camera_counter("cam1", "seq") == "fw:count:ingest:cam1:seq"
    assert k.frames_trimmed_unread() == "fw:count:frames_trimmed_unread"
    assert k.frames_trimmed_pending() == "fw:count:frames_trimmed_pending"
    assert k.camera_counter("cam1", "oom") == "fw:count:ingest:cam1:oom"
    assert k.replica_barrier() == "fw:replica:barrier"


def test_keys_parse_back_into_their_parts() -> None:
    k = Keys("fw")
    assert k.heartbeat_of(k.heartbeat("edge", "host-1:7").encode()) == ("edge", "host-1:7")
    assert k.camera_of_info(k.camera_info("hall")) == "hall"
    assert k.parse(k.heartbeat("cloud", "gpu-0"), k.heartbeat_pattern("cloud")) == ("gpu-0",)
    with pytest.raises(ValueError, match="does not match"):
        k.camera_of_info("fw:camera:hall:state")
    with pytest.raises(ValueError, match="does not match"):
        k.heartbeat_of("other:heartbeat:edge:x")
