"""Transport: 60 KB frames through Redis streams with fallwatch's own code vs redis-benchmark.

fallwatch's path, on one connection each way, as the roles do it:

* write: ingest's own loop (``ingest.pipeline.run_pipeline`` → ``Publisher.handle``: schemas.encode,
  one MULTI/EXEC round trip with the XADDs, XLEN, the camera's counters and ``last_frame_at``; the
  trim script only once the stream is a chunk over ``stream_maxlen``) draining a buffer a producer
  fills as fast as it can, so a backlog is written up to ``ingest.write_batch`` frames per round
  trip, with a ready 60 KB JPEG payload instead of a camera frame (JPEG encoding is ingest's cost,
  measured by bench_ingest);
* read: XREADGROUP COUNT edge.batch_size as ``EdgeWorker.read``, ``schemas.decode`` of every entry,
  XACK of the batch in the next read's round trip (the worker's XACK rides its verdict
  transaction; ``fallwatch_read_ack_alone_per_s`` is the read with an XACK round trip of its own).

The reference is Debian's ``redis-benchmark`` on the same server with one client and no
pipelining: ``XADD`` of the same 60 KB field (``-x``), then ``XREADGROUP ... COUNT batch``, and
``SET -d 60000`` for scale. A frame has to be written and read once: the combined rate of a
writer and a reader taking turns is ``1 / (1/write + 1/read)``, computed the same way for both.
fallwatch's writer and reader are also run at the same time (two threads): ``concurrent``.
``write_ab``: the write path before (one frame per round trip, as a live camera with nothing
queued writes) and after (a backlog batched), alternating on the same server.

    .venv/bin/python bench/bench_transport.py --out bench/results/transport [--quick]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from common import Machine, figure, load_average, median_ratio

PAYLOAD = 60_000
BATCH = 8


@dataclass(frozen=True)
class Rates:
    write_per_s: float
    read_per_s: float
    combined_per_s: float  # one write and one read per frame, taking turns


@dataclass(frozen=True)
class Round:
    fallwatch: Rates
    fallwatch_concurrent_per_s: float
    fallwatch_read_ack_alone_per_s: float  # the read with an XACK round trip of its own per batch
    redis_benchmark: Rates
    redis_benchmark_set_per_s: float
    load_average_1m: float


@dataclass(frozen=True)
class TransportBench:
    frames: int
    payload_bytes: int
    batch: int
    rounds: tuple[Round, ...]  # reference and fallwatch alternate, so each pair shares the machine's load
    frames_per_s: float  # median combined fallwatch rate
    reference_per_s: float  # median combined redis-benchmark rate
    ratio: float  # median of the pairwise ratios
    write_ab: dict[str, object]  # write path one frame per round trip (before) and batched (after)


def combined(write: float, read: float) -> Rates:
    return Rates(round(write, 1), round(read, 1), round(1 / (1 / write + 1 / read), 1))


def payload() -> bytes:
    """60 KB of random bytes without NUL (redis-benchmark reads ``-x`` stdin as a C string)."""
    import numpy as np

    return np.random.default_rng(0).integers(1, 256, PAYLOAD, dtype=np.uint8).tobytes()


# --- fallwatch's path ----------------------------------------------------------------------------


def make_publisher(client, keys, settings, data: bytes):
    """An ingest Publisher whose items are a ready JPEG instead of an encoded camera frame."""
    from fallwatch.schemas import FrameMessage
    from ingest.publisher import Publisher

    class ReadyPublisher(Publisher):
        def build(self, parts):
            rec = parts[-1]
            msg = FrameMessage.make(self.camera_id, rec.seq, captured_at=rec.captured_at, width=640, height=640)
            return msg, [data]

    return ReadyPublisher(client, keys, "bench", settings.ingest, threading.Event())


def write_ab(url: str, frames: int, data: bytes, rounds: int) -> dict[str, object]:
    """Write rates one item per round trip (before: every frame flushed alone) and as ingest's loop
    writes a backlog (after: up to ``ingest.write_batch`` per round trip), alternating on one server."""
    import redis

    from fallwatch.keys import Keys
    from fallwatch.settings import Settings

    settings = Settings(redis={"url": url}, ingest={"stream_maxlen": 4 * frames})
    client, keys = redis.Redis.from_url(url), Keys("fwab")
    publisher = make_publisher(client, keys, settings, data)
    paths = {"one_per_round_trip": write_one_by_one, "batched": write_frames}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for path in paths.values():
        path(publisher, 20)
    for _ in range(rounds):
        for name, path in paths.items():
            rates[name].append(round(path(publisher, frames), 1))
            client.delete(keys.frames_stream())
    client.close()
    return {**rates, "write_batch": settings.ingest.write_batch,
            "speedup": round(median_ratio(rates["batched"], rates["one_per_round_trip"]), 3)}


def record(seq: int):
    import numpy as np

    from ingest.records import FrameRecord

    return FrameRecord("bench", seq, time.time(), np.zeros((1, 1, 3), np.uint8))


def write_one_by_one(publisher, frames: int) -> float:
    """Frames/s of ``publisher.publish`` one frame at a time, each written before the next (a live camera)."""
    start = time.perf_counter()
    for i in range(frames):
        publisher.publish([record(i)])
    return frames / (time.perf_counter() - start)


def write_frames(publisher, frames: int) -> float:
    """Frames/s of ingest's own loop (``run_pipeline``) publishing ``frames`` a producer thread
    buffers as fast as it can: a backlog, written up to ``ingest.write_batch`` per round trip."""
    from ingest.pipeline import run_pipeline
    from ingest.records import BufferPolicy, FrameBuffer

    def produce(buffer, halt) -> None:
        for i in range(frames):
            buffer.put(record(i), halt)
        buffer.close()

    before = publisher.stats.items
    start = time.perf_counter()
    run_pipeline("bench", produce, FrameBuffer(frames, BufferPolicy.WAIT), publisher, threading.Event())
    if publisher.stats.items - before != frames:
        raise RuntimeError(f"wrote {publisher.stats.items - before} of {frames} frames")
    return frames / (time.perf_counter() - start)


def read_frames(worker, frames: int, ack_alone: bool = False) -> float:
    """Frames/s read as the edge worker reads (XREADGROUP COUNT ``edge.batch_size``, ``schemas.decode``
    of every entry) and acknowledged. Each batch's XACK rides the next XREADGROUP's round trip, as
    in the worker it rides the verdict transaction: it has no round trip of its own. ``ack_alone``:
    an XACK round trip of its own per batch."""
    from fallwatch.schemas import FrameMessage, decode

    client, keys, done, unacked = worker.client, worker.keys, 0, []
    start = time.perf_counter()
    while done < frames:
        pipe = client.pipeline(transaction=False)
        if unacked:
            (client if ack_alone else pipe).xack(keys.frames_stream(), keys.edge_group(), *unacked)
        pipe.xreadgroup(keys.edge_group(), worker.name, {keys.frames_stream(): ">"}, count=worker.cfg.batch_size,
                        block=1000)
        entries = [entry for _stream, batch in (pipe.execute()[-1] or []) for entry in batch]
        for _eid, fields in entries:
            decode(fields, expect=FrameMessage)
        unacked = [eid for eid, _fields in entries]
        done += len(entries)
    if unacked:
        client.xack(keys.frames_stream(), keys.edge_group(), *unacked)
    return frames / (time.perf_counter() - start)


class NoModel:
    """The edge model's identity only: the transport bench reads frames and never scores them."""

    model_id, questions = "bench", ("Is the person falling?",)


def fallwatch_rates(url: str, frames: int, data: bytes) -> tuple[Rates, float, float]:
    import redis

    from edge_worker.worker import EdgeWorker
    from fallwatch.keys import Keys
    from fallwatch.settings import Settings

    settings = Settings(redis={"url": url}, ingest={"stream_maxlen": 4 * frames}, edge={"batch_size": BATCH})
    writer, reader = redis.Redis.from_url(url), redis.Redis.from_url(url)
    keys = Keys("fwbench")
    worker = EdgeWorker(settings, reader, keys, model=NoModel(), name="bench")  # read() never scores
    worker.ensure_group()
    publisher = make_publisher(writer, keys, settings, data)
    write_frames(publisher, 20)  # warm up connections and code paths
    read_frames(worker, 20)
    sequential = combined(write_frames(publisher, frames), read_frames(worker, frames))
    write_frames(publisher, frames)
    ack_alone = round(read_frames(worker, frames, ack_alone=True), 1)
    start = time.perf_counter()
    thread = threading.Thread(target=write_frames, args=(publisher, frames))
    thread.start()
    read_frames(worker, frames)
    thread.join()
    concurrent = frames / (time.perf_counter() - start)
    writer.delete(keys.frames_stream())
    writer.close()
    reader.close()
    return sequential, round(concurrent, 1), ack_alone


# --- redis-benchmark ----------------------------------------------------------------------------


def redis_benchmark(socket: Path, requests: int, *command: str, stdin: bytes | None = None) -> float:
    """Requests per second of one redis-benchmark client without pipelining."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark not found (apt-get install redis-tools)")
    args = [exe, "-s", str(socket), "-c", "1", "-P", "1", "-n", str(requests), "--csv", *command]
    out = subprocess.run(args, input=stdin, capture_output=True, check=True, timeout=300).stdout.decode()
    rows = list(csv.reader(io.StringIO(out)))
    return float(rows[-1][1])


def reference_rates(socket: Path, url: str, frames: int, data: bytes) -> tuple[Rates, float]:
    import redis

    client = redis.Redis.from_url(url)
    stream = "rbench:stream"
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    write = redis_benchmark(socket, frames, "-x", "XADD", stream, "MAXLEN", "~", str(4 * frames), "*", "p0",
                            stdin=data)
    reads = redis_benchmark(socket, frames // BATCH, "XREADGROUP", "GROUP", "g", "c", "COUNT", str(BATCH),
                            "STREAMS", stream, ">")
    set_rate = redis_benchmark(socket, frames, "-t", "set", "-d", str(len(data)))
    entry = client.xrange(stream, count=1)[0][1]
    client.delete(stream, "key:__rand_int__")
    client.close()
    if entry.get(b"p0") != data:
        raise RuntimeError("redis-benchmark did not write the 60 KB payload into the stream entry")
    return combined(write, reads * BATCH), round(set_rate, 1)


def run_transport(work: Path, quick: bool) -> TransportBench:
    from fallwatch.redis import EmbeddedRedis

    frames, rounds = (500, 3) if quick else (2000, 5)
    data = payload()
    results = []
    with EmbeddedRedis(work / "redis", appendonly=False) as server:
        reference_rates(server.socket_path, server.url, 100, data)  # warm up the server's buffers
        ab = write_ab(server.url, frames, data, rounds)
        for _ in tqdm(range(rounds), desc="transport rounds", leave=False):
            reference, set_rate = reference_rates(server.socket_path, server.url, frames, data)
            ours, concurrent, ack_alone = fallwatch_rates(server.url, frames, data)
            results.append(Round(ours, concurrent, ack_alone, reference, set_rate, load_average()[0]))
    ratio = median_ratio([r.fallwatch.combined_per_s for r in results], [r.redis_benchmark.combined_per_s for r in results])
    return TransportBench(frames, len(data), BATCH, tuple(results),
                          statistics.median(r.fallwatch.combined_per_s for r in results),
                          statistics.median(r.redis_benchmark.combined_per_s for r in results), round(ratio, 3), ab)


def parser_ab(rounds: int, frames: int) -> dict[str, list[float]]:
    """fallwatch's combined and concurrent rates with redis-py's pure-Python reply parser and with
    hiredis, each round in two fresh processes (A B A B): hiredis is chosen when redis is imported."""
    import subprocess as sp
    import sys

    out: dict[str, list[float]] = {}
    for _ in tqdm(range(rounds), desc="redis parser A/B", leave=False):
        for parser in ("python", "hiredis"):
            args = [sys.executable, __file__, "--out", "-", "--fallwatch-only", "--parser", parser,
                    "--frames", str(frames)]
            rates = json.loads(sp.run(args, capture_output=True, check=True, timeout=300).stdout.decode().splitlines()[-1])
            out.setdefault(f"{parser}_combined_per_s", []).append(rates["combined_per_s"])
            out.setdefault(f"{parser}_concurrent_per_s", []).append(rates["concurrent_per_s"])
    return out


def fallwatch_only(frames: int) -> dict[str, float]:
    from fallwatch.redis import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp, EmbeddedRedis(Path(tmp) / "redis", appendonly=False) as server:
        rates, concurrent, _ack_alone = fallwatch_rates(server.url, frames, payload())
    return asdict(rates) | {"concurrent_per_s": concurrent}


def figures(bench: TransportBench, machine: Machine) -> list:
    return [
        figure("transport.frames_per_s", bench.frames_per_s, "frames/s", machine, frames=bench.frames,
               payload_bytes=bench.payload_bytes, batch=bench.batch, rounds=[asdict(r) for r in bench.rounds]),
        figure("transport.ratio_vs_redis_benchmark", bench.ratio, "ratio", machine, ">= 0.8", lambda v: v >= 0.8,
               reference_per_s=bench.reference_per_s,
               reference="redis-benchmark -c 1 -P 1: XADD of the same 60 KB field, XREADGROUP COUNT 8"),
        figure("transport.write_speedup_batched", bench.write_ab["speedup"], "x", machine, **bench.write_ab),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for transport.json")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 500 frames instead of 5 of 2000")
    ap.add_argument("--parser-ab", type=int, default=0, help="also N rounds: pure-Python reply parser vs hiredis")
    ap.add_argument("--fallwatch-only", action="store_true", help=argparse.SUPPRESS)  # one A/B half, JSON on stdout
    ap.add_argument("--parser", choices=["python", "hiredis"], default="hiredis", help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=2000, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fallwatch_only:
        if args.parser == "python":
            sys.modules["hiredis"] = None  # type: ignore[assignment]  # redis-py then uses its own parser
        print(json.dumps(fallwatch_only(args.frames)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    machine = Machine.here()
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        bench = run_transport(Path(tmp), args.quick)
    result = {f.name: f.to_json() for f in figures(bench, machine)}
    if args.parser_ab:
        ab = parser_ab(args.parser_ab, 500 if args.quick else 2000)
        result["transport.frames_per_s"]["details"]["parser_ab"] = ab
        print(json.dumps(ab, indent=2))
    (args.out / "transport.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(asdict(bench), indent=2))


if __name__ == "__main__":
    main()
