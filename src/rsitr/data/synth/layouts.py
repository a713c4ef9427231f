"""Canonical layouts: one function per scene class, drawing the scene facing one way.

Each ``layout_*`` function places the large structures and medium objects (e.g. the runway at
the top, the terminal at the bottom) and lists the candidate *slots* where each kind of small
object may go. :func:`rsitr.data.synth.scenes.build_layout` then rotates/mirrors the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from rsitr.data.synth.spec import Box, Layout, ObjectGroup, Placement, Point, Structure

T = TypeVar("T")

_ROOF = ("red", "grey", "brown", "blue", "white")  # roof colours of buildings

# --- helpers -------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _pick(rng: np.random.Generator, seq: Sequence[T]) -> T:
    return seq[int(rng.integers(len(seq)))]


def _rect(x0: float, y0: float, x1: float, y1: float) -> tuple[Point, ...]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> tuple[Point, ...]:
    return tuple(
        (cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)
    )


def region_of(area: Box) -> str:
    """The region word for a box: ``centre`` near the middle, else the dominant side."""
    dx, dy = (area[0] + area[2]) / 2 - 0.5, (area[1] + area[3]) / 2 - 0.5
    if max(abs(dx), abs(dy)) < 0.15:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _place(
    area: Box, relation: str = "", anchor: str = "", angle: float = 0.0, scatter: bool = False
) -> Placement:
    return Placement(area, region_of(area), relation, anchor, angle, scatter)


def _group(kind: str, count: int, colour: str, area: Box, angle: float = 0.0) -> ObjectGroup:
    return ObjectGroup(kind, count, colour, _place(area, angle=angle))


def _hband(kind: str, name: str, colour: str, y: float, width: float) -> Structure:
    return Structure(kind, name, colour, ((-0.02, y), (1.02, y)), width)


# --- canonical layouts ---------------------------------------------------------------------------


def layout_airport(rng: np.random.Generator) -> Layout:
    """Runway at the top, apron and terminal below; planes beside the terminal or on the runway."""
    ry, rw = _u(rng, 0.14, 0.2), _u(rng, 0.08, 0.1)
    tx0 = _u(rng, 0.05, 0.3)
    tx1, ty = tx0 + _u(rng, 0.45, 0.6), _u(rng, 0.76, 0.8)
    apron_top = ry + rw / 2 + 0.08
    structures = (
        Structure("area", "apron", "light grey", _rect(tx0 - 0.04, apron_top, tx1 + 0.04, ty)),
        Structure("road", "taxiway", "grey", ((tx1 - 0.06, ry), (tx1 - 0.06, apron_top)), 0.035),
        Structure("runway", "runway", "dark grey", ((-0.02, ry), (1.02, ry)), rw),
    )
    terminal = _group(
        "terminal", 1, _pick(rng, ("grey", "white", "light grey")), (tx0, ty - 0.03, tx1, ty + 0.06)
    )
    slots = {
        "plane": (
            _place((tx0, apron_top + 0.03, tx1, ty - 0.04), "beside", "terminal", 270.0),
            _place((0.06, ry - rw * 0.3, 0.94, ry + rw * 0.3), "on", "runway", 0.0),
        ),
        "car": (_place((tx0, ty + 0.07, tx1, ty + 0.13), "near", "terminal", 90.0),),
    }
    return Layout(structures, (terminal,), slots)


def layout_parking(rng: np.random.Generator) -> Layout:
    """Road at the top, a lot with three rows of stalls, a building below; cars in a row."""
    x0, x1, y0, y1 = _u(rng, 0.04, 0.1), _u(rng, 0.9, 0.96), _u(rng, 0.2, 0.25), _u(rng, 0.76, 0.8)
    structures = (
        _hband("road", "road", "dark grey", 0.08, 0.08),
        Structure("lot", "parking lot", "dark grey", _rect(x0, y0, x1, y1), angle=0.0),
    )
    bx = _u(rng, 0.04, 0.4)
    building = _group(
        "building",
        1,
        _pick(rng, ("white", "light grey", "brown", "red")),
        (bx, 0.84, bx + _u(rng, 0.3, 0.5), 0.98),
    )
    h = (y1 - y0) / 3
    rows = tuple(
        _place((x0 + 0.02, y0 + k * h + 0.02, x1 - 0.02, y0 + (k + 1) * h - 0.02), "in", "parking lot", 90.0)
        for k in range(3)
    )
    slots = {"car": rows, "tree": (_place((0.02, 0.13, 0.98, 0.18), "along", "road"),)}
    return Layout(structures, (building,), slots)


def layout_port(rng: np.random.Generator) -> Layout:
    """Land on the left, sea on the right with piers; ships beside a pier or in the open sea."""
    cx = _u(rng, 0.4, 0.48)
    coast = tuple((cx + _u(rng, -0.025, 0.025), y) for y in np.linspace(-0.02, 1.02, 8))
    structures = (
        Structure("water", "sea", "water", coast + ((1.02, 1.02), (1.02, -0.02))),
        Structure("road", "road", "grey", ((cx - 0.07, -0.02), (cx - 0.07, 1.02)), 0.045),
    )
    num_piers, length = int(rng.integers(2, 4)), _u(rng, 0.36, 0.44)
    py0, py1 = 0.12, 0.88
    piers = _group(
        "pier",
        num_piers,
        _pick(rng, ("light grey", "white", "brown")),
        (cx - 0.05, py0, cx - 0.05 + length, py1),
    )
    warehouses = _group(
        "warehouse", int(rng.integers(2, 7)), _pick(rng, _ROOF), (0.03, 0.06, cx - 0.11, 0.94), 90.0
    )
    half = length * 0.86 / 7 / 2  # pier half-thickness, see render's medium fill
    pier_ys = [py0 + (k + 0.5) * (py1 - py0) / num_piers for k in range(num_piers)]
    beside = tuple(
        _place((cx + 0.03, y + half + 0.01, cx + length - 0.08, y + half + 0.08), "beside", "pier")
        for y in pier_ys
    )
    open_sea = _place((cx + length + 0.02, 0.06, 0.97, 0.94), "", "", 90.0, scatter=True)
    slots = {
        "ship": (*beside, open_sea),
        "boat": (
            _place(
                (cx + 0.04, 0.0, cx + length, pier_ys[0] - half - 0.02), "near", "coast", 0.0, scatter=True
            ),
        ),
        "truck": (_place((cx - 0.085, 0.04, cx - 0.055, 0.96), "along", "road", 90.0),),
    }
    return Layout(structures, (piers, warehouses), slots)


def layout_farmland(rng: np.random.Generator) -> Layout:
    """Four crop parcels split by a dirt road, farmhouses in a corner; trees along the road."""
    ry, xa, xb = _u(rng, 0.42, 0.6), _u(rng, 0.35, 0.65), _u(rng, 0.3, 0.7)
    crops = ("green", "yellow", "brown", "light green")
    boxes = (
        (0.0, 0.0, xa, ry - 0.03),
        (xa + 0.01, 0.0, 1.0, ry - 0.03),
        (0.0, ry + 0.03, xb, 1.0),
        (xb + 0.01, ry + 0.03, 1.0, 1.0),
    )
    fields = tuple(
        Structure("field", "field", _pick(rng, crops), _rect(*b), angle=_pick(rng, (0.0, 90.0)))
        for b in boxes
    )
    structures = (*fields, _hband("path", "road", "brown", ry, 0.05))
    houses = _group("farmhouse", int(rng.integers(1, 4)), _pick(rng, _ROOF), (0.04, 0.04, 0.3, ry - 0.12))
    slots = {
        "tree": (
            _place((0.04, ry - 0.075, 0.96, ry - 0.04), "along", "road"),
            _place((0.04, ry + 0.04, 0.96, ry + 0.075), "along", "road"),
            _place((0.34, 0.04, 0.62, ry - 0.12), "near", "farmhouse", scatter=True),
        ),
        "truck": (_place((0.05, ry - 0.015, 0.95, ry + 0.015), "on", "road", 0.0),),
    }
    return Layout(structures, (houses,), slots)


def layout_residential(rng: np.random.Generator) -> Layout:
    """Road grid with blocks of houses and one park; cars along a road, trees in the park."""
    ya, yb, xa, w = _u(rng, 0.28, 0.32), _u(rng, 0.68, 0.72), _u(rng, 0.45, 0.55), 0.06
    structures = [
        _hband("road", "road", "dark grey", ya, w),
        _hband("road", "road", "dark grey", yb, w),
        Structure("road", "road", "dark grey", ((xa, -0.02), (xa, 1.02)), w),
    ]
    cols, rows = ((0.0, xa), (xa, 1.0)), ((0.0, ya), (ya, yb), (yb, 1.0))
    m = w / 2 + 0.025
    blocks = [(c[0] + m, r[0] + m, c[1] - m, r[1] - m) for r in rows for c in cols]
    park = int(rng.integers(len(blocks)))
    structures.append(Structure("area", "park", "green", _rect(*blocks[park])))
    roof = _pick(rng, _ROOF)
    houses = tuple(
        _group("house", int(rng.integers(2, 5)), roof, b, _pick(rng, (0.0, 90.0)))
        for i, b in enumerate(blocks)
        if i != park
    )
    slots = {
        "car": (
            _place((0.02, ya - 0.018, 0.98, ya + 0.018), "along", "road"),
            _place((0.02, yb - 0.018, 0.98, yb + 0.018), "along", "road"),
            _place((xa - 0.018, 0.02, xa + 0.018, 0.98), "along", "road", 90.0),
        ),
        "tree": (_place(blocks[park], "in", "park", scatter=True),),
    }
    return Layout(tuple(structures), houses, slots)


def layout_bridge(rng: np.random.Generator) -> Layout:
    """Vertical river crossed by a road on a bridge; cars on the bridge, boats on the river."""
    rx, rw, by = _u(rng, 0.42, 0.58), _u(rng, 0.16, 0.22), _u(rng, 0.38, 0.62)
    freq, phase = _u(rng, 0.6, 1.2), _u(rng, 0.0, 2 * math.pi)
    river = tuple(
        (rx + 0.025 * math.sin(2 * math.pi * freq * y + phase), y) for y in np.linspace(-0.05, 1.05, 12)
    )
    left, right = rx - rw / 2 - 0.05, rx + rw / 2 + 0.05
    structures = (
        Structure("river", "river", "water", river, rw),
        _hband("road", "road", "grey", by, 0.06),
        Structure(
            "bridge", "bridge", _pick(rng, ("white", "light grey", "red")), ((left, by), (right, by)), 0.075
        ),
    )
    bank = (0.03, left - 0.04) if rng.random() < 0.5 else (right + 0.04, 0.97)
    upper = (0.05, by - 0.09) if rng.random() < 0.5 else (by + 0.09, 0.95)
    buildings = _group(
        "building", int(rng.integers(2, 5)), _pick(rng, _ROOF), (bank[0], upper[0], bank[1], upper[1])
    )
    slots = {
        "car": (
            _place((left + 0.02, by - 0.025, right - 0.02, by + 0.025), "on", "bridge"),
            _place((0.02, by - 0.018, left - 0.03, by + 0.018), "along", "road"),
            _place((right + 0.03, by - 0.018, 0.98, by + 0.018), "along", "road"),
        ),
        "boat": (
            _place((rx - 0.04, 0.04, rx + 0.04, by - 0.1), "on", "river", 90.0),
            _place((rx - 0.04, by + 0.1, rx + 0.04, 0.96), "on", "river", 90.0),
        ),
        "tree": (
            _place((left - 0.05, 0.04, left - 0.01, 0.96), "along", "river"),
            _place((right + 0.01, 0.04, right + 0.05, 0.96), "along", "river"),
        ),
    }
    return Layout(structures, (buildings,), slots)


def layout_forest(rng: np.random.Generator) -> Layout:
    """Dense canopy, a dirt road and a clearing with cabins; cars on the road or by the cabins."""
    rx = _u(rng, 0.35, 0.6)
    side = -1.0 if rng.random() < 0.5 else 1.0
    ccx, ccy = rx + side * _u(rng, 0.2, 0.26), _u(rng, 0.3, 0.7)
    structures = (
        Structure("canopy", "trees", "dark green", _rect(0.0, 0.0, 1.0, 1.0)),
        Structure("path", "road", "brown", ((rx, -0.02), (rx, 1.02)), 0.05),
        Structure("area", "clearing", "light green", _ellipse(ccx, ccy, 0.14, 0.14)),
    )
    cabins = _group(
        "cabin", int(rng.integers(1, 3)), _pick(rng, _ROOF), (ccx - 0.09, ccy - 0.06, ccx + 0.09, ccy + 0.04)
    )
    slots = {
        "car": (
            _place((rx - 0.015, 0.03, rx + 0.015, 0.45), "on", "road", 90.0),
            _place((rx - 0.015, 0.55, rx + 0.015, 0.97), "on", "road", 90.0),
            _place((ccx - 0.09, ccy + 0.05, ccx + 0.09, ccy + 0.1), "near", "cabin", 90.0),
        ),
    }
    return Layout(structures, (cabins,), slots)


def layout_beach(rng: np.random.Generator) -> Layout:
    """Sea at the top, sand, a road and hotels; umbrellas on the sand, boats on the sea."""
    sy, phase = _u(rng, 0.28, 0.36), _u(rng, 0.0, 2 * math.pi)
    coast = tuple((x, sy + 0.02 * math.sin(4 * x + phase)) for x in np.linspace(1.02, -0.02, 10))
    structures = (
        Structure("area", "sand", "sand", _rect(-0.02, sy - 0.06, 1.02, sy + 0.32)),
        Structure("water", "sea", "water", ((-0.02, -0.02), (1.02, -0.02), *coast)),
        _hband("road", "road", "grey", sy + 0.36, 0.05),
    )
    hotels = _group(
        "hotel",
        int(rng.integers(2, 5)),
        _pick(rng, ("white", "light grey", "orange")),
        (0.04, sy + 0.42, 0.96, 0.97),
    )
    y0, y1 = sy + 0.05, sy + 0.29
    slots = {
        "umbrella": tuple(
            _place((a, y0, a + 0.28, y1), "on", "beach", scatter=True) for a in (0.04, 0.36, 0.68)
        ),
        "boat": (_place((0.05, 0.04, 0.95, sy - 0.07), "on", "sea", 0.0, scatter=True),),
    }
    return Layout(structures, (hotels,), slots)


def layout_playground(rng: np.random.Generator) -> Layout:
    """Running track with a grandstand, a road at the bottom; cars near the track, trees aside."""
    x0, y0, x1, y1 = _u(rng, 0.15, 0.2), _u(rng, 0.24, 0.3), _u(rng, 0.8, 0.85), _u(rng, 0.68, 0.74)
    structures = (
        Structure("track", "running track", "track red", _rect(x0, y0, x1, y1)),
        _hband("road", "road", "grey", 0.92, 0.05),
    )
    stands = _group(
        "grandstand",
        int(rng.integers(1, 3)),
        _pick(rng, ("grey", "white", "blue", "red")),
        (x0 + 0.05, 0.05, x1 - 0.05, y0 - 0.04),
    )
    slots = {
        "car": (
            _place((0.06, y1 + 0.04, 0.94, 0.87), "near", "running track", 90.0),
            _place((0.02, 0.902, 0.98, 0.938), "along", "road"),
        ),
        "tree": (
            _place((0.02, 0.08, x0 - 0.03, y1), "", "", scatter=True),
            _place((x1 + 0.03, 0.08, 0.98, y1), "", "", scatter=True),
        ),
    }
    return Layout(structures, (stands,), slots)


def layout_industrial(rng: np.random.Generator) -> Layout:
    """Road across, storage tanks above, warehouses below; trucks along the road or by tanks."""
    ry, xs = _u(rng, 0.45, 0.55), _u(rng, 0.58, 0.68)
    structures = (_hband("road", "road", "dark grey", ry, 0.07),)
    tanks = _group(
        "tank", int(rng.integers(2, 9)), _pick(rng, ("white", "light grey")), (0.04, 0.04, xs, ry - 0.06)
    )
    warehouses = _group("warehouse", int(rng.integers(1, 4)), _pick(rng, _ROOF), (0.04, ry + 0.06, 0.7, 0.96))
    slots = {
        "truck": (
            _place((0.02, ry - 0.025, 0.98, ry + 0.025), "along", "road"),
            _place((xs + 0.04, 0.05, 0.96, ry - 0.07), "near", "tank", 0.0),
        ),
        "car": (_place((0.74, ry + 0.07, 0.96, 0.95), "beside", "warehouse", 0.0),),
    }
    return Layout(structures, (tanks, warehouses), slots)


def layout_railwaystation(rng: np.random.Generator) -> Layout:
    """Parallel tracks with platforms and a station building; trains on a track."""
    num_tracks, y0, pitch = int(rng.integers(3, 6)), _u(rng, 0.22, 0.28), 0.085
    ys = [y0 + k * pitch for k in range(num_tracks)]
    platforms = tuple(
        Structure("area", "platform", "light grey", _rect(0.08, ys[k] + 0.027, 0.92, ys[k + 1] - 0.027))
        for k in range(0, num_tracks - 1, 2)
    )
    rails = tuple(_hband("rail", "railway track", "dark grey", y, 0.045) for y in ys)
    structures = (_hband("road", "road", "grey", 0.08, 0.05), *platforms, *rails)
    sy = ys[-1] + 0.06
    station = _group(
        "station",
        1,
        _pick(rng, ("light grey", "white", "brown", "red")),
        (0.15, sy, 0.85, min(sy + 0.13, 0.97)),
    )
    slots = {
        "train": tuple(_place((0.03, y - 0.016, 0.97, y + 0.016), "on", "railway track") for y in ys),
        "car": (_place((0.02, 0.105, 0.98, 0.14), "along", "road", 90.0),),
    }
    return Layout(structures, (station,), slots)


def layout_pond(rng: np.random.Generator) -> Layout:
    """Pond in a park with a path and a pavilion; boats on the pond, trees around it."""
    cx, cy, rx, ry = _u(rng, 0.45, 0.55), _u(rng, 0.4, 0.5), _u(rng, 0.24, 0.3), _u(rng, 0.2, 0.25)
    py = cy + ry + 0.12
    structures = (
        Structure("water", "pond", "water", _ellipse(cx, cy, rx, ry)),
        _hband("path", "path", "sand", py, 0.035),
    )
    pavilion = _group(
        "pavilion", 1, _pick(rng, ("red", "white", "brown")), (0.03, 0.03, cx - rx * 0.7, cy - ry - 0.02)
    )
    slots = {
        "boat": (
            _place(
                (cx - rx * 0.6, cy - ry * 0.55, cx + rx * 0.6, cy + ry * 0.55),
                "on",
                "pond",
                0.0,
                scatter=True,
            ),
        ),
        "tree": (
            _place((0.02, cy - ry, cx - rx - 0.02, 0.97), "", "", scatter=True),
            _place((cx + rx + 0.02, 0.04, 0.98, 0.97), "", "", scatter=True),
            _place((0.04, py + 0.03, 0.96, py + 0.07), "along", "path"),
        ),
    }
    return Layout(structures, (pavilion,), slots)
