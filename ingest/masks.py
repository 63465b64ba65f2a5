"""Per-camera masks: polygons filled in the camera process before a frame is encoded.

``privacy`` regions are filled black, so their pixels never reach Redis, the cloud, a snapshot
or a web page; ``ignore`` regions (a bed, a sofa) are filled grey, so no model ever sees a person
lying there. Both are one boolean mask per frame size, built once with ``cv2.fillPoly`` and
applied to every frame as one masked assignment.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from fallwatch.settings import MaskSettings

FILL = {"privacy": (0, 0, 0), "ignore": (128, 128, 128)}  # RGB
OUTLINE = {"privacy": (255, 0, 255), "ignore": (0, 255, 255)}  # RGB, preview only


def polygon_pixels(mask: MaskSettings, width: int, height: int) -> np.ndarray:
    """The polygon's corners in pixel coordinates of a width x height frame (int32, for OpenCV)."""
    scale = np.array([width - 1, height - 1], np.float64)
    return np.round(np.asarray(mask.points, np.float64) * scale).astype(np.int32)


def region(masks: Sequence[MaskSettings], width: int, height: int) -> np.ndarray:
    """HxW boolean array: True inside any of ``masks``."""
    canvas = np.zeros((height, width), np.uint8)
    if masks:
        cv2.fillPoly(canvas, [polygon_pixels(m, width, height) for m in masks], 1)
    return canvas.astype(bool)


class Masker:
    """Fills one camera's masks into its frames, in place. Per frame size it keeps, for each kind
    present, a uint8 mask drawn once with ``cv2.fillPoly`` and a frame of the fill colour; a frame
    then costs one ``cv2.copyTo`` per kind (about 0.02 ms for both at 640x480; bench/bench_masks.py)."""

    def __init__(self, masks: Sequence[MaskSettings]):
        self.masks = list(masks)
        self._layers: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}

    def __bool__(self) -> bool:
        return bool(self.masks)

    def layers(self, width: int, height: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(uint8 mask, fill frame) per kind present, privacy last so it wins where both overlap."""
        key = (width, height)
        if key not in self._layers:
            self._layers[key] = [self._layer(kind, width, height) for kind in ("ignore", "privacy")
                                 if any(m.kind == kind for m in self.masks)]
        return self._layers[key]

    def _layer(self, kind: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        inside = region([m for m in self.masks if m.kind == kind], width, height).astype(np.uint8)
        fill = np.empty((height, width, 3), np.uint8)
        fill[:] = FILL[kind]
        return inside, fill

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Fill the masks into ``rgb`` (an HxWx3 uint8 array, in place unless read-only) and return it."""
        if not self.masks:
            return rgb
        if not (rgb.flags.writeable and rgb.flags.c_contiguous):
            rgb = np.ascontiguousarray(rgb).copy()
        height, width = rgb.shape[:2]
        for inside, fill in self.layers(width, height):
            cv2.copyTo(fill, inside, rgb)
        return rgb


def preview(rgb: np.ndarray, masks: Sequence[MaskSettings], alpha: float = 0.5) -> np.ndarray:
    """A copy of ``rgb`` with the masks drawn for an installer: privacy filled as the stream gets it,
    ignore tinted (``alpha`` of its fill colour) so the bed beneath stays visible, every polygon outlined."""
    out = rgb.copy()
    height, width = out.shape[:2]
    ignore = region([m for m in masks if m.kind == "ignore"], width, height)
    tint = np.array(FILL["ignore"], np.float32)
    out[ignore] = np.round(out[ignore] * (1 - alpha) + tint * alpha).astype(np.uint8)
    Masker([m for m in masks if m.kind == "privacy"]).apply(out)
    for m in masks:
        cv2.polylines(out, [polygon_pixels(m, width, height)], True, OUTLINE[m.kind], 2)
    return out
