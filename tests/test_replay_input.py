"""Bad replay input: nothing replayed is a failure, skipped files are counted and named, one policy
(skip, or --strict to stop), a label typo named as such; unpaced replays keep pace with the edge."""

from __future__ import annotations

import os
import threading

import pytest
from typer.testing import CliRunner

from fallwatch.settings import Settings
from ingest.replay import run_replay, video_source
from tests.ingest_media import write_mp4, write_yolo
from tests.test_ingest_sources import restore_logging  # noqa: F401 - a fixture


@pytest.fixture
def replay(settings: Settings, restore_logging):  # noqa: F811
    from fallwatch.cli import app
    from ingest.cli import register

    if "replay" not in {c.name for c in app.registered_commands}:
        register(app)
    env = {"FALLWATCH_REDIS__URL": settings.redis.url.get_secret_value()}

    def invoke(*args: str):
        return CliRunner().invoke(app, ["replay", "--fps", "200", "--speed", "0", *args], env=env)
    return invoke


def test_a_file_that_is_not_a_video_replays_nothing_and_fails(replay, tmp_path) -> None:
    notes = tmp_path / "README.md"
    notes.write_text("# not a video\n")
    res = replay("--video", str(notes))
    assert res.exit_code == 2, res.output
    assert "replayed 0 items" in res.output and "skipped 1 file" in res.output
    assert f"skipped {notes}:" in res.output and "nothing was replayed" in res.output


def bad_dataset(tmp_path):
    root = write_yolo(tmp_path / "ds", "valid", [0, 1, 0, 1])
    images = root / "valid" / "images"
    good = (images / "img001.jpg").read_bytes()
    (images / "img001.jpg").write_bytes(good[: len(good) // 2])          # truncated
    (images / "img002.jpg").write_bytes(os.urandom(4000))                 # random bytes
    return root, images


def test_bad_images_are_skipped_counted_and_named(replay, tmp_path, r, keys) -> None:
    root, images = bad_dataset(tmp_path)
    res = replay("--dataset", str(root))
    assert res.exit_code == 0, res.output
    assert "replayed 2 items" in res.output and "skipped 2 files" in res.output
    assert f"skipped {images / 'img001.jpg'}" in res.output and f"skipped {images / 'img002.jpg'}" in res.output
    assert r.xlen(keys.frames_stream()) == 2


def test_strict_stops_at_the_first_bad_file(replay, tmp_path) -> None:
    root, images = bad_dataset(tmp_path)
    res = replay("--dataset", str(root), "--strict")
    assert res.exit_code == 2 and "img001.jpg" in res.output and "--strict" in res.output
    assert "Traceback" not in res.output


def test_a_label_typo_is_named_as_a_bad_label(replay, tmp_path) -> None:
    clip = write_mp4(tmp_path / "clip.mp4", frames=4)
    res = replay("--video", f"{clip}:falls")
    assert res.exit_code == 2 and "'falls' is not a label (use FILE:fall or FILE:nofall)" in res.output
    assert "does not exist" not in res.output


def test_a_wrong_split_names_the_splits_there(replay, tmp_path) -> None:
    root = write_yolo(tmp_path / "ds", "train", [0, 1])
    res = replay("--dataset", str(root), "--split", "test")
    assert res.exit_code == 2 and "splits here: train" in res.output


def test_a_replay_without_an_edge_worker_says_so(replay, tmp_path) -> None:
    root = write_yolo(tmp_path / "ds", "valid", [0, 1])
    res = replay("--dataset", str(root))
    assert res.exit_code == 0 and "no edge worker is running" in res.output


def test_unpaced_replay_stays_a_few_batches_ahead_of_the_edge(settings: Settings, r, keys, tmp_path) -> None:
    r.xgroup_create(keys.frames_stream(), keys.edge_group(), id="0", mkstream=True)
    source = video_source([str(write_mp4(tmp_path / "clip.mp4", frames=120, fps=20))])
    done: list = []
    t = threading.Thread(target=lambda: done.append(run_replay(settings, source, r, keys, threading.Event(),
                                                               fps=20, speed=0)))
    t.start()
    window, read, ahead = 4 * settings.edge.batch_size, 0, []
    while t.is_alive() or read < r.xlen(keys.frames_stream()):
        got = r.xreadgroup(keys.edge_group(), "w", {keys.frames_stream(): ">"}, count=1, block=200)
        read += sum(len(entries) for _, entries in got)
        ahead.append(r.xlen(keys.frames_stream()) - read)
    t.join(30)
    assert done[0].items == 120 == read
    assert max(ahead) <= window, max(ahead)        # before: every frame at once, stream_maxlen // 2 ahead


