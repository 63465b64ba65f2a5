"""fallwatch's benchmark suite: every figure, one JSON object and one Markdown table.

    .venv/bin/python bench/run.py [--quick] --out DIR [--only edge,e2e] [--images DIR]

Sections (each also runs on its own, see its module):

* ``edge`` (bench_edge): ViLT-B/32 bare and inside the EdgeWorker, the switcher's cost;
* ``limits`` (bench_limits): GEMM speed on the edge's shapes, FLOPs per frame, the edge worker as a
  fraction of that bound, and where the rest goes;
* ``forward`` (bench_edge): the edge model's forward pass before and after its optimisation;
* ``transport`` (bench_transport): 60 KB frames through Redis streams vs redis-benchmark;
* ``ingest`` (bench_ingest): H.264 cameras per CPU core;
* ``e2e`` (bench_e2e): capture-to-verdict latency of 16 replayed cameras at 1 fps;
* ``upfall`` (bench_upfall): cameras per box on UP-Fall footage, gating on and off, falls through the
  gate, and the same with audits, live DMD store, budget, web and MQTT on;
* ``cloud`` (bench_cloud): tiny LLaVA batch 8 vs 1, and the 7B paper estimate;
* ``live_dmd`` (bench_live_dmd): drift noticed, switcher refreshed and hot-reloaded on a planted stream.
* ``budget`` (bench_budget): the cloud budget at run time on real workers with planted scores.

``DIR/results.json`` is a flat object, figure name -> {value, unit, target, met, load_average,
machine (CPU, cores, torch, Python, git revision), details}. ``--quick`` runs every section with
fewer and shorter runs, and the two sections that check behaviour on planted scores rather than
speed (``live_dmd`` and ``budget``) side by side; its target is 90 s in all (``suite.total_s``),
and the full-size model must already be cached, which the first run of either mode does.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from bench_upfall import DEFAULT_UPFALL
from common import bench_start, DEFAULT_CACHE, Figure, Machine, figure, full_vilt_dir

SECTIONS = ("edge", "limits", "forward", "transport", "ingest", "e2e", "upfall", "cloud", "live_dmd", "budget")
BESIDE = ("live_dmd", "budget")  # behaviour, not speed: side by side with --quick (see beside_of)


class Suite:
    """Runs the sections in order; later sections reuse what earlier ones found (the edge's mode)."""

    def __init__(self, args: argparse.Namespace, work: Path, machine: Machine):
        self.args, self.work, self.machine = args, work, machine
        self.edge_mode, self.edge_batch, self.latency_batch = "int8", 8, 4
        self._models: dict | None = None

    def models(self) -> dict:
        import bench_edge

        if self._models is None:
            self._models = bench_edge.load_models(self.args.cache)
        return self._models

    def edge(self) -> list[Figure]:
        import bench_edge

        bench = bench_edge.run_edge(self.args.cache, self.work / "edge", self.args.quick, models=self.models())
        self.edge_mode, self.edge_batch = bench.mode, bench.batch
        self.latency_batch = bench_edge.latency_batch(bench.sweep, bench.mode)
        return bench_edge.figures(bench, self.machine)

    def limits(self) -> list[Figure]:
        import bench_limits

        lim = bench_limits.run_limits(self.models(), self.edge_mode, self.edge_batch, self.work / "limits", self.args.quick)
        return bench_limits.figures(lim, self.machine)

    def forward(self) -> list[Figure]:
        import bench_edge

        result = bench_edge.forward_ab(self.models()[self.edge_mode], self.edge_mode, self.edge_batch, self.args.quick)
        self._models = None  # the later sections run the edge in its own process
        return [bench_edge.forward_figure(result, self.machine)]

    def transport(self) -> list[Figure]:
        import bench_transport

        figures = bench_transport.figures(bench_transport.run_transport(self.work / "transport", self.args.quick),
                                          self.machine)
        if not self.args.quick:  # before/after of the hiredis reply parser, in fresh processes
            figures[0].details["parser_ab"] = bench_transport.parser_ab(5, 2000)
        return figures

    def ingest(self) -> list[Figure]:
        import ingest_section

        return ingest_section.figures(ingest_section.run_ingest(self.work / "ingest", self.args.quick), self.machine)

    def e2e(self) -> list[Figure]:
        import bench_e2e

        runs = bench_e2e.run_e2e(self.args.cache, self.work / "e2e", self.args.quick, self.edge_mode,
                                 self.latency_batch, images=self.args.images,
                                 step_down=0 if self.args.quick else 3, step_up=0 if self.args.quick else 2)
        return bench_e2e.figures(runs, self.machine)

    def upfall(self) -> list[Figure]:
        import bench_upfall

        bench = bench_upfall.run_upfall(self.args.cache, self.work / "upfall", self.args.quick, self.edge_mode,
                                        self.latency_batch, self.args.upfall, 16 if self.args.quick else 24,
                                        8 if self.args.quick else 12, features=not self.args.quick,
                                        edge_workers=os.cpu_count() or 1)
        return bench_upfall.figures(bench, self.machine)

    def cloud(self) -> list[Figure]:
        import bench_cloud

        runs, speedup, positions = bench_cloud.cloud_speedup(self.args.cache, self.args.quick)
        return bench_cloud.figures(runs, speedup, positions, self.machine)

    def live_dmd(self) -> list[Figure]:
        import bench_live_dmd

        result = bench_live_dmd.run_bench(self.work / "live_dmd", self.args.quick)
        self.args.out.mkdir(parents=True, exist_ok=True)
        bench_live_dmd.plot(result, self.args.out)
        return bench_live_dmd.figures(result, self.machine)
    def budget(self) -> list[Figure]:
        import bench_budget

        return bench_budget.figures(bench_budget.run_budget(self.work / "budget", self.args.quick), self.machine)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md")
    ap.add_argument("--quick", action="store_true", help="every section, fewer and shorter runs (target: 90 s in all)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--images", type=Path, help="folder of 640x640 .jpg frames for the e2e cameras (default: drawn)")
    ap.add_argument("--upfall", type=Path, default=DEFAULT_UPFALL,
                    help="folder of the UP-Fall clips for the upfall section (missing: its rows say so)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the full-size ViLT checkpoint is kept")
    args = ap.parse_args()
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def run_sections(suite: Suite, names: list[str]) -> tuple[list[Figure], dict[str, float]]:
    figures, seconds = [], {}
    beside = beside_of(names, suite.args.quick)
    for name in tqdm([n for n in names if n not in beside.values()], desc="bench suite", unit="section"):
        section: Callable[[], list[Figure]] = getattr(suite, name)
        if name in beside:
            section = with_beside(suite, section, beside[name], seconds)
        own, seconds[name] = timed(section)
        figures += own
    return figures, seconds


def with_beside(suite: Suite, section: Callable[[], list[Figure]], other: str,
                seconds: dict[str, float]) -> Callable[[], list[Figure]]:
    """``section`` with section ``other`` running beside it in a spawned process: both sets of figures."""
    def both() -> list[Figure]:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            future = pool.submit(run_one, suite.args, suite.work, suite.machine, other)
            own = section()
            other_figures, seconds[other] = future.result()
        return own + other_figures
    return both


def timed(section: Callable[[], list[Figure]]) -> tuple[list[Figure], float]:
    start = time.perf_counter()
    figures = section()
    return figures, round(time.perf_counter() - start, 1)


def beside_of(names: list[str], quick: bool) -> dict[str, str]:
    """With ``--quick``, the sections that check behaviour on planted scores rather than speed run
    side by side, the second in a process of its own (they come last, after every speed section)."""
    first, second = BESIDE
    return {first: second} if quick and first in names and second in names else {}


def run_one(args: argparse.Namespace, work: Path, machine: Machine, name: str) -> tuple[list[Figure], float]:
    """One section in a process of its own: its figures and seconds."""
    from fallwatch import logging as fw_logging

    fw_logging.configure("error", "console")
    return timed(getattr(Suite(args, work, machine), name))


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    machine = bench_start("error")  # the ingest section overloads a stream on purpose
    names = [s for s in SECTIONS if s in args.only.split(",")]
    if set(names) & {"edge", "limits", "forward", "e2e", "upfall"}:
        full_vilt_dir(args.cache)  # built once, outside the timed sections
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        figures, seconds = run_sections(Suite(args, Path(tmp), machine), names)
    total = round(time.perf_counter() - start, 1)
    figures.append(figure("suite.total_s", total, "s", machine, "< 90 with --quick" if args.quick else "",
                          (lambda v: v < 90) if args.quick else None, sections_s=seconds, quick=args.quick,
                          side_by_side=list(BESIDE) if beside_of(names, args.quick) else []))
    results = {f.name: f.to_json() for f in figures}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "results.md").write_text(markdown(figures, machine, args.quick))
    print(markdown(figures, machine, args.quick))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {total} s")


def markdown(figures: list[Figure], machine: Machine, quick: bool) -> str:
    lines = [
        "# fallwatch benchmark results", "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {machine.cpu} ({machine.isa}) · {machine.cores} cores · "
        f"torch {machine.torch} · "
        f"Python {machine.python} · git {machine.git} · {'quick' if quick else 'full'} run · "
        f"load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}", "",
        "| figure | value | target | holds | load average (1, 5, 15 min) |", "|---|---|---|---|---|",
    ]
    for f in figures:
        held = {True: "yes", False: "**no**", None: ""}[f.met]
        value = "n/a" if f.value is None else f"{f.value:g} {f.unit}"
        lines.append(f"| `{f.name}` | {value} | {f.target} | {held} | {', '.join(f'{x:.2f}' for x in f.load_average)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
