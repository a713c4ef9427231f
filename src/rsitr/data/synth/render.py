"""Rendering a :class:`~rsitr.data.synth.spec.SceneSpec` with numpy noise and PIL ImageDraw.

Three layers: a noisy class-coloured ground, large structures, then medium and small objects. The
ground, structures and medium objects depend only on ``spec.layout_seed``, so siblings (which share
it) differ only where their small objects differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from rsitr.data.synth.scenes import get_scene_class
from rsitr.data.synth.spec import COLOURS, ObjectGroup, SceneSpec, Structure

RGB = tuple[int, int, int]
XY = tuple[float, float]


def _shade(rgb: RGB, f: float) -> RGB:
    """Darker (``f < 1``) or lighter (``f > 1``) version of a colour."""
    r, g, b = (c * f if f <= 1 else c + (255 - c) * (f - 1) for c in rgb)
    return (int(r), int(g), int(b))


def _shape(cx: float, cy: float, scale: float, angle: float, pts: Sequence[XY]) -> list[XY]:
    """Unit-shape points (x along the object's long axis) -> rotated, scaled pixel points."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + scale * (u * c - v * s), cy + scale * (u * s + v * c)) for u, v in pts]


def _box(u0: float, v0: float, u1: float, v1: float) -> list[XY]:
    return [(u0, v0), (u1, v0), (u1, v1), (u0, v1)]


# --- layer 1: ground -----------------------------------------------------------------------------


def _upsample(a: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a, "F").resize((size, size), Image.BILINEAR))


def _ground(size: int, rgb: RGB, amp: float, rng: np.random.Generator) -> Image.Image:
    coarse = _upsample(rng.random((5, 5), dtype=np.float32), size)
    fine = _upsample(rng.random((size // 8, size // 8), dtype=np.float32), size)
    lum = amp * (0.65 * coarse + 0.35 * fine - 0.5)  # (S, S)
    base = np.asarray(rgb, np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
    img = base + lum[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# --- layer 2: structures -------------------------------------------------------------------------


def _band_geometry(s: Structure, size: int) -> tuple[list[XY], int, XY, XY]:
    """Pixel polyline, pixel width, unit direction and unit normal of a two-point band."""
    pts = [(x * size, y * size) for x, y in s.points]
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    d = ((x1 - x0) / length, (y1 - y0) / length)
    return pts, max(2, round(s.width * size)), d, (-d[1], d[0])


def _dashes(draw: ImageDraw.ImageDraw, a: XY, b: XY, dash: float, fill: RGB, width: int) -> None:
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    for k in range(int(length // (2 * dash))):
        t0, t1 = 2 * k * dash / length, (2 * k + 1) * dash / length
        draw.line(
            [(a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t) for t in (t0, t1)], fill=fill, width=width
        )


def _offset(p: XY, n: XY, k: float) -> XY:
    return (p[0] + n[0] * k, p[1] + n[1] * k)


def _paint_band(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    pts, w, _, _ = _band_geometry(s, size)
    draw.line(pts, fill=COLOURS[s.colour], width=w, joint="curve")


def _paint_road(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    pts, w, _, _ = _band_geometry(s, size)
    draw.line(pts, fill=COLOURS[s.colour], width=w)
    if w >= 8:
        _dashes(draw, pts[0], pts[-1], size * 0.02, (220, 220, 200), 1)


def _paint_runway(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    pts, w, _, n = _band_geometry(s, size)
    a, b = pts[0], pts[-1]
    draw.line([a, b], fill=COLOURS[s.colour], width=w)
    for k in (-0.42, 0.42):
        draw.line([_offset(a, n, k * w), _offset(b, n, k * w)], fill=(225, 225, 225), width=1)
    _dashes(draw, a, b, size * 0.03, (240, 240, 240), max(1, w // 10))


def _paint_rail(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    pts, w, d, n = _band_geometry(s, size)
    a, b = pts[0], pts[-1]
    draw.line([a, b], fill=(116, 104, 92), width=w)
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    for k in range(0, int(length), max(3, size // 56)):  # sleepers
        c = (a[0] + d[0] * k, a[1] + d[1] * k)
        draw.line([_offset(c, n, -0.3 * w), _offset(c, n, 0.3 * w)], fill=(90, 76, 62), width=1)
    for k in (-0.18, 0.18):
        draw.line([_offset(a, n, k * w), _offset(b, n, k * w)], fill=(60, 60, 66), width=1)


def _paint_river(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    pts, w, _, _ = _band_geometry(s, size)
    draw.line(pts, fill=(96, 104, 70), width=w + max(2, size // 40), joint="curve")  # banks
    draw.line(pts, fill=COLOURS[s.colour], width=w, joint="curve")


def _paint_bridge(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    pts, w, _, n = _band_geometry(s, size)
    a, b = pts[0], pts[-1]
    sh = max(2, size // 50)
    draw.line([(a[0] + sh, a[1] + sh), (b[0] + sh, b[1] + sh)], fill=(20, 40, 50), width=w)
    rgb = COLOURS[s.colour]
    draw.line([a, b], fill=rgb, width=w)
    for k in (-0.45, 0.45):
        draw.line([_offset(a, n, k * w), _offset(b, n, k * w)], fill=_shade(rgb, 0.6), width=1)


def _paint_area(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    draw.polygon([(x * size, y * size) for x, y in s.points], fill=COLOURS[s.colour])


def _paint_water(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    pts = [(x * size, y * size) for x, y in s.points]
    draw.polygon(pts, fill=COLOURS[s.colour])
    foam = (150, 180, 190)
    for p, q in zip(pts, pts[1:] + pts[:1], strict=True):  # foam on shore edges, not on the frame
        on_frame = all(not (0 < c < size) for c in (p[0], q[0])) or all(
            not (0 < c < size) for c in (p[1], q[1])
        )
        if not on_frame:
            draw.line([p, q], fill=foam, width=max(1, size // 100))


def _bbox(s: Structure, size: int) -> tuple[float, float, float, float]:
    xs, ys = [x * size for x, _ in s.points], [y * size for _, y in s.points]
    return min(xs), min(ys), max(xs), max(ys)


def _paint_field(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = _bbox(s, size)
    rgb = COLOURS[s.colour]
    draw.rectangle([x0, y0, x1, y1], fill=rgb)
    stripe, step = _shade(rgb, 0.82), max(3, size // 45)
    if abs(math.cos(math.radians(s.angle))) > 0.5:
        for y in np.arange(y0 + step / 2, y1, step):
            draw.line([(x0, y), (x1, y)], fill=stripe, width=1)
    else:
        for x in np.arange(x0 + step / 2, x1, step):
            draw.line([(x, y0), (x, y1)], fill=stripe, width=1)


def _paint_lot(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = _bbox(s, size)
    draw.rectangle([x0, y0, x1, y1], fill=COLOURS[s.colour], outline=(200, 200, 200))
    line, step = (210, 210, 210), size * 0.045
    horizontal = abs(math.cos(math.radians(s.angle))) > 0.5  # rows run along x
    for k in range(1, 3):
        if horizontal:
            y = y0 + k * (y1 - y0) / 3
            draw.line([(x0, y), (x1, y)], fill=line, width=1)
        else:
            x = x0 + k * (x1 - x0) / 3
            draw.line([(x, y0), (x, y1)], fill=line, width=1)
    for k in range(3):  # stall dividers
        if horizontal:
            ya, yb = y0 + k * (y1 - y0) / 3, y0 + (k + 0.45) * (y1 - y0) / 3
            for x in np.arange(x0 + step, x1, step):
                draw.line([(x, ya), (x, yb)], fill=line, width=1)
        else:
            xa, xb = x0 + k * (x1 - x0) / 3, x0 + (k + 0.45) * (x1 - x0) / 3
            for y in np.arange(y0 + step, y1, step):
                draw.line([(xa, y), (xb, y)], fill=line, width=1)


def _paint_track(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = _bbox(s, size)
    r = min(x1 - x0, y1 - y0) / 2
    lane = r * 0.28
    draw.rounded_rectangle([x0, y0, x1, y1], radius=r, fill=COLOURS[s.colour])
    for k in (0.35, 0.7):
        draw.rounded_rectangle(
            [x0 + k * lane, y0 + k * lane, x1 - k * lane, y1 - k * lane],
            radius=r - k * lane,
            outline=(230, 220, 210),
            width=1,
        )
    box = [x0 + lane, y0 + lane, x1 - lane, y1 - lane]
    draw.rounded_rectangle(box, radius=r - lane, fill=(60, 140, 60), outline=(240, 240, 240))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if x1 - x0 >= y1 - y0:
        draw.line([(cx, box[1]), (cx, box[3])], fill=(240, 240, 240), width=1)
    else:
        draw.line([(box[0], cy), (box[2], cy)], fill=(240, 240, 240), width=1)
    rc = r * 0.25
    draw.ellipse([cx - rc, cy - rc, cx + rc, cy + rc], outline=(240, 240, 240))


def _paint_canopy(draw: ImageDraw.ImageDraw, s: Structure, size: int, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = _bbox(s, size)
    n = int((x1 - x0) * (y1 - y0) / (size * 0.045) ** 2)
    xy = rng.uniform((x0, y0), (x1, y1), (n, 2))
    radius = rng.uniform(0.012, 0.026, n) * size
    tone = rng.uniform(0.7, 1.6, n)
    base = COLOURS[s.colour]
    for (x, y), r, t in zip(xy, radius, tone, strict=True):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_shade(base, float(t)))


STRUCTURE_PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, Structure, int, np.random.Generator], None]] = {
    "area": _paint_area,
    "bridge": _paint_bridge,
    "canopy": _paint_canopy,
    "field": _paint_field,
    "lot": _paint_lot,
    "path": _paint_band,
    "rail": _paint_rail,
    "river": _paint_river,
    "road": _paint_road,
    "runway": _paint_runway,
    "track": _paint_track,
    "water": _paint_water,
}

# --- layer 3: objects ----------------------------------------------------------------------------

_PLANE = [
    (0.5, 0.0),
    (0.4, 0.06),
    (0.08, 0.06),
    (-0.08, 0.5),
    (-0.18, 0.5),
    (-0.1, 0.06),
    (-0.36, 0.05),
    (-0.46, 0.2),
    (-0.52, 0.2),
    (-0.48, 0.0),
    (-0.52, -0.2),
    (-0.46, -0.2),
    (-0.36, -0.05),
    (-0.1, -0.06),
    (-0.18, -0.5),
    (-0.08, -0.5),
    (0.08, -0.06),
    (0.4, -0.06),
]
_HULL = [(0.5, 0.0), (0.28, 0.14), (-0.5, 0.14), (-0.5, -0.14), (0.28, -0.14)]
_SHADOW: RGB = (30, 32, 30)

# small objects: kind -> (length as a fraction of the image side, width / length)
SMALL_SIZES: dict[str, tuple[float, float]] = {
    "plane": (0.085, 1.0),
    "car": (0.04, 0.5),
    "truck": (0.06, 0.38),
    "ship": (0.1, 0.28),
    "boat": (0.045, 0.4),
    "tree": (0.036, 1.0),
    "umbrella": (0.028, 1.0),
    "train": (0.28, 0.1),
}
# medium objects: kind -> (drawing style, length / width)
MEDIUM_SHAPES: dict[str, tuple[str, float]] = {
    "terminal": ("building", 5.0),
    "building": ("building", 1.5),
    "warehouse": ("building", 2.0),
    "hotel": ("building", 1.6),
    "station": ("building", 3.5),
    "grandstand": ("stand", 5.0),
    "house": ("house", 1.4),
    "farmhouse": ("house", 1.5),
    "cabin": ("house", 1.3),
    "pavilion": ("house", 1.0),
    "tank": ("tank", 1.0),
    "pier": ("pier", 7.0),
}


def _draw_small(draw: ImageDraw.ImageDraw, kind: str, c: XY, length: float, angle: float, rgb: RGB) -> None:
    x, y = c
    sh = max(1.0, length * 0.12)
    if kind == "plane":
        draw.polygon(_shape(x + sh, y + sh, length, angle, _PLANE), fill=_SHADOW)
        draw.polygon(_shape(x, y, length, angle, _PLANE), fill=rgb)
    elif kind in ("car", "truck"):
        half = SMALL_SIZES[kind][1] / 2
        draw.polygon(_shape(x + 1, y + 1, length, angle, _box(-0.5, -half, 0.5, half)), fill=_SHADOW)
        if kind == "car":
            draw.polygon(_shape(x, y, length, angle, _box(-0.5, -half, 0.5, half)), fill=rgb)
            draw.polygon(
                _shape(x, y, length, angle, _box(0.1, -half * 0.8, 0.28, half * 0.8)), fill=(40, 44, 52)
            )
        else:
            draw.polygon(_shape(x, y, length, angle, _box(-0.5, -half, 0.22, half)), fill=rgb)
            draw.polygon(_shape(x, y, length, angle, _box(0.28, -half, 0.5, half)), fill=(210, 210, 210))
    elif kind in ("ship", "boat"):
        draw.polygon(
            _shape(x, y, length, angle, _HULL if kind == "ship" else [(u, v * 1.4) for u, v in _HULL]),
            fill=rgb,
        )
        deck = (250, 250, 250) if rgb != COLOURS["white"] else (120, 120, 120)
        draw.polygon(_shape(x, y, length, angle, _box(-0.42, -0.08, -0.12, 0.08)), fill=deck)
    elif kind in ("tree", "umbrella"):
        r = length / 2
        if kind == "tree":
            draw.ellipse([x - r + sh, y - r + sh, x + r + sh, y + r + sh], fill=_SHADOW)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb, outline=_shade(rgb, 0.7))
        if kind == "umbrella":
            draw.line([(x - r, y), (x + r, y)], fill=(250, 250, 250), width=1)
            draw.line([(x, y - r), (x, y + r)], fill=(250, 250, 250), width=1)
    elif kind == "train":
        draw.polygon(_shape(x, y, length, angle, _box(-0.5, -0.05, 0.5, 0.05)), fill=rgb)
        for u in (-0.25, 0.0, 0.25):
            draw.line(_shape(x, y, length, angle, [(u, -0.05), (u, 0.05)]), fill=(30, 30, 30))
    else:
        raise ValueError(f"unknown small object kind {kind!r}")


def _draw_medium(
    draw: ImageDraw.ImageDraw, kind: str, c: XY, length: float, width: float, angle: float, rgb: RGB
) -> None:
    x, y = c
    style = MEDIUM_SHAPES[kind][0]
    hw = width / length / 2  # half width in units of length
    body = _box(-0.5, -hw, 0.5, hw)
    sh = max(1.5, width * 0.25)
    if style == "tank":
        r = length / 2
        draw.ellipse([x - r + sh, y - r + sh, x + r + sh, y + r + sh], fill=_SHADOW)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb, outline=_shade(rgb, 0.6))
        ri = r * 0.6
        draw.ellipse([x - ri, y - ri, x + ri, y + ri], outline=_shade(rgb, 0.75))
        return
    if style != "pier":
        draw.polygon(_shape(x + sh, y + sh, length, angle, body), fill=_SHADOW)
    draw.polygon(_shape(x, y, length, angle, body), fill=rgb, outline=_shade(rgb, 0.65))
    if style == "house":  # pitched roof: one half darker
        draw.polygon(_shape(x, y, length, angle, _box(-0.5, 0.0, 0.5, hw)), fill=_shade(rgb, 0.78))
    elif style == "building":
        draw.polygon(
            _shape(x, y, length, angle, _box(-0.42, -hw * 0.35, 0.42, hw * 0.35)), fill=_shade(rgb, 0.88)
        )
    elif style == "stand":
        for v in (-hw * 0.5, 0.0, hw * 0.5):
            draw.line(_shape(x, y, length, angle, [(-0.48, v), (0.48, v)]), fill=_shade(rgb, 0.7))


def _is_horizontal(angle: float) -> bool:
    return abs(math.cos(math.radians(angle))) >= abs(math.sin(math.radians(angle)))


def _medium_positions(g: ObjectGroup, size: int) -> tuple[list[XY], float, float]:
    """Grid cells for a medium group: centres, object length and width (pixels)."""
    x0, y0, x1, y1 = (v * size for v in g.place.area)
    aspect = MEDIUM_SHAPES[g.kind][1]
    horizontal = _is_horizontal(g.place.angle)

    def cell(cols: int) -> tuple[float, float, int]:
        rows = math.ceil(g.count / cols)
        w, h = (x1 - x0) / cols, (y1 - y0) / rows
        return (w, h, rows) if horizontal else (h, w, rows)  # (along, across, rows)

    def misfit(cols: int) -> float:
        along, across, _ = cell(cols)
        return abs(math.log(along / across / aspect))

    cols = min(range(1, g.count + 1), key=misfit)
    along, across, rows = cell(cols)
    length = min(along * 0.86, across * 0.86 * aspect)
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    centres = [(x0 + (k % cols + 0.5) * cw, y0 + (k // cols + 0.5) * ch) for k in range(g.count)]
    return centres, length, length / aspect


def _small_positions(g: ObjectGroup, size: int, rng: np.random.Generator) -> list[XY]:
    """Object centres (pixels): packed rows (``scatter=False``) or random grid cells."""
    x0, y0, x1, y1 = (v * size for v in g.place.area)
    frac, ratio = SMALL_SIZES[g.kind]
    length, width = frac * size, frac * size * ratio
    a = math.radians(g.place.angle)
    ext_x = abs(length * math.cos(a)) + abs(width * math.sin(a))
    ext_y = abs(length * math.sin(a)) + abs(width * math.cos(a))
    horizontal = (x1 - x0) >= (y1 - y0)  # rows run along the area's long side
    long_len, short_len = (x1 - x0, y1 - y0) if horizontal else (y1 - y0, x1 - x0)
    pitch_l = (ext_x if horizontal else ext_y) * 1.6
    pitch_s = (ext_y if horizontal else ext_x) * 1.3
    cols = max(1, int(long_len // pitch_l))
    if g.place.scatter:  # random cells of a grid spread over the whole area
        rows = max(1, int(short_len // pitch_s), math.ceil(g.count / cols))
        pitch_l, pitch_s = long_len / cols, short_len / rows
        cells = sorted(rng.choice(rows * cols, g.count, replace=False).tolist())
        jitter = 0.25
    else:  # a contiguous run of cells, like parked vehicles; trees spread along the whole row
        if g.kind == "tree" and g.count < cols:
            cols, pitch_l = g.count, long_len / g.count
        rows = math.ceil(g.count / cols)
        if rows > 1:
            pitch_s = min(pitch_s, short_len / rows)
        start = int(rng.integers(cols - g.count + 1)) if g.count < cols else 0
        cells = [start + k for k in range(g.count)]
        jitter = 0.05
    l0 = (long_len - cols * pitch_l) / 2
    s0 = (short_len - rows * pitch_s) / 2
    out = []
    for k in cells:
        u = l0 + (k % cols + 0.5 + rng.uniform(-jitter, jitter)) * pitch_l
        v = s0 + (k // cols + 0.5 + rng.uniform(-jitter, jitter)) * pitch_s
        out.append((x0 + u, y0 + v) if horizontal else (x0 + v, y0 + u))
    return out


def _draw_group_small(draw: ImageDraw.ImageDraw, g: ObjectGroup, size: int, rng: np.random.Generator) -> None:
    length = SMALL_SIZES[g.kind][0] * size
    spread = 30.0 if g.place.scatter else 3.0
    for c in _small_positions(g, size, rng):
        angle = g.place.angle + float(rng.uniform(-spread, spread))
        _draw_small(draw, g.kind, c, length, angle, COLOURS[g.colour])


def render_scene(spec: SceneSpec, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Render a scene spec as an RGB image.

    Args:
        spec: the :class:`~rsitr.data.synth.spec.SceneSpec` to draw.
        size: image side in pixels (square images).
        rng: jitter of the small objects; ``None`` derives it from ``spec.layout_seed`` so that
            siblings with the same small objects are pixel-identical.

    Returns:
        A ``size x size`` RGB image.

    Raises:
        ValueError: for a size below 32 or an unknown structure/object kind.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    cls = get_scene_class(spec.scene)
    layout_rng = np.random.default_rng([spec.layout_seed, 1])
    img = _ground(size, cls.ground, cls.ground_amp, layout_rng)
    draw = ImageDraw.Draw(img)
    for s in spec.structures:
        if s.kind not in STRUCTURE_PAINTERS:
            raise ValueError(f"unknown structure kind {s.kind!r}")
        STRUCTURE_PAINTERS[s.kind](draw, s, size, layout_rng)
    for g in spec.medium:
        centres, length, width = _medium_positions(g, size)
        for c in centres:
            _draw_medium(draw, g.kind, c, length, width, g.place.angle, COLOURS[g.colour])
    if rng is None:
        rng = np.random.default_rng([spec.layout_seed, 2])
    seeds = rng.integers(2**32, size=4)  # one stream per group: changing one leaves the others
    for g, seed in zip(spec.small, seeds, strict=False):
        _draw_group_small(draw, g, size, np.random.default_rng(int(seed)))
    arr = np.array(img, dtype=np.int16)  # sensor grain over everything, shared by siblings
    arr += layout_rng.integers(-5, 6, (size, size, 1), dtype=np.int16)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")
