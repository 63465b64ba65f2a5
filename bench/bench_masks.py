"""Cost of camera masks per frame, beside the JPEG encoding of the same frame, in one run.

    .venv/bin/python bench/bench_masks.py [--quick] --out DIR

Writes DIR/masks.json and DIR/masks.md: the median time to fill a care-home room's masks (a bed
to ignore, a bathroom door kept private) into a 640x480 frame, the first frame of a size (which
draws the masks), and ``encode_jpeg`` of that frame, with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from fallwatch.settings import MaskSettings
from ingest.jpeg import encode_jpeg
from ingest.masks import Masker

from common import write_report

ROOM = [MaskSettings(kind="ignore", name="bed", points=[(0.05, 0.45), (0.55, 0.45), (0.55, 0.95), (0.05, 0.95)]),
        MaskSettings(kind="privacy", name="bathroom door", points=[(0.75, 0.0), (1.0, 0.0), (1.0, 0.7), (0.78, 0.7)])]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(repeats: int, width: int = 640, height: int = 480) -> dict[str, float]:
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    masker = Masker(ROOM)
    masker.apply(frame)
    fill = median_ms(lambda: masker.apply(frame), repeats)
    first = median_ms(lambda: Masker(ROOM).apply(frame), max(5, repeats // 20))
    jpeg = median_ms(lambda: encode_jpeg(frame, 85, 1280), max(5, repeats // 10))
    return {"fill_ms": fill, "first_frame_ms": first, "jpeg_ms": jpeg, "jpeg_over_fill": jpeg / fill}


def markdown(r: dict[str, float]) -> str:
    return "\n".join([
        "| 640x480 frame, bed ignored + bathroom door private | ms (median) |",
        "|---|---|",
        f"| fill both masks (`Masker.apply`) | {r['fill_ms']:.3f} |",
        f"| first frame of a size (draws the masks) | {r['first_frame_ms']:.3f} |",
        f"| `encode_jpeg`, quality 85 | {r['jpeg_ms']:.3f} |",
        f"| JPEG / fill | {r['jpeg_over_fill']:.0f}x |", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="Fewer repeats.")
    args = ap.parse_args()
    result = measure(200 if args.quick else 2000)
    write_report(args.out, "masks", result, markdown(result))


if __name__ == "__main__":
    main()
