"""A private, seeded random stream for one block of torch code, leaving every generator as it was.

``torch.manual_seed`` reseeds the CPU generator *and every CUDA device's*, while
``torch.random.fork_rng(devices=[])`` restores only the CPU one: together they leave the CUDA
generators reseeded. :func:`seeded` seeds only the CPU generator and the one of ``device`` (if it
is a CUDA device), and restores exactly those on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def cuda_index(device: torch.device | None) -> int | None:
    """The CUDA device index of ``device``, or None for any other device."""
    if device is None or device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the CPU generator (and ``device``'s CUDA generator) seeded with ``seed``."""
    index = cuda_index(device)
    with torch.random.fork_rng(devices=[] if index is None else [index]):
        torch.random.default_generator.manual_seed(seed)
        if index is not None:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
