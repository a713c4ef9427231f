"""Scene specifications: the dataclasses every other synth module reads, colours and regions.

Coordinates are normalised to ``[0, 1]`` with ``y`` growing downwards (image convention), so a
spec renders at any size. Angles are in degrees, measured from the ``+x`` axis towards ``+y``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), normalised
Point = tuple[float, float]

#: Colour names used in captions and their RGB values.
COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 232),
    "light grey": (178, 178, 174),
    "grey": (122, 122, 120),
    "dark grey": (72, 72, 74),
    "black": (28, 28, 30),
    "red": (196, 42, 36),
    "orange": (232, 128, 30),
    "yellow": (228, 200, 40),
    "green": (70, 150, 60),
    "light green": (140, 186, 90),
    "dark green": (34, 82, 38),
    "blue": (38, 84, 196),
    "brown": (124, 84, 48),
    "sand": (214, 196, 150),
    "water": (46, 92, 128),
    "track red": (170, 70, 56),
}

#: Where a group lies in the image; caption phrases come from these names.
REGIONS = ("left", "right", "top", "bottom", "centre")


@dataclass(frozen=True)
class Structure:
    """A large structure (layer 2): a band such as a runway or river, or a filled area.

    Attributes:
        kind: drawing primitive, a key of ``render.STRUCTURE_PAINTERS`` (``runway``, ``water``...).
        name: the caption noun (``"runway"``, ``"field"``, ``"sea"``).
        colour: a key of :data:`COLOURS`.
        points: polyline for bands, polygon for areas (normalised).
        width: band width (normalised); 0 for filled areas.
        angle: main direction of markings inside the structure (parking rows, crop stripes).
    """

    kind: str
    name: str
    colour: str
    points: tuple[Point, ...]
    width: float = 0.0
    angle: float = 0.0


@dataclass(frozen=True)
class Placement:
    """Where a group of objects goes and how captions describe it.

    Attributes:
        area: box the objects are laid out in.
        region: one of :data:`REGIONS`, the coarse position named in captions.
        relation: ``"beside"``, ``"near"``, ``"along"``, ``"on"``, ``"in"`` or ``""`` (region only).
        anchor: caption noun the relation refers to (``"terminal"``, ``"road"``).
        angle: heading of the objects' long axis.
        scatter: ``False`` packs objects in neat rows (parked), ``True`` scatters them on a grid.
    """

    area: Box
    region: str
    relation: str = ""
    anchor: str = ""
    angle: float = 0.0
    scatter: bool = False


@dataclass(frozen=True)
class ObjectGroup:
    """A group of identical objects (layer 3): kind, count, colour and placement.

    Attributes:
        kind: object noun, a key of ``render.OBJECT_SHAPES`` (``plane``, ``tank``, ``house``...).
        count: number of objects (1..9 for small objects, so captions can spell it).
        colour: a key of :data:`COLOURS`.
        place: where the objects go.
    """

    kind: str
    count: int
    colour: str
    place: Placement


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render one scene and write its captions.

    Attributes:
        scene: scene class name, one of ``SCENE_CLASSES``.
        layout_seed: seeds the background texture and the layout; siblings share it.
        structures: large structures, drawn in order over the background.
        medium: medium objects (buildings, tanks, piers).
        small: small objects (planes, cars, ships, trees); ``small[0]`` is the primary group.
    """

    scene: str
    layout_seed: int
    structures: tuple[Structure, ...]
    medium: tuple[ObjectGroup, ...]
    small: tuple[ObjectGroup, ...]


@dataclass(frozen=True)
class Layout:
    """Structures, medium objects and small-object slots of one scene (before small objects).

    Attributes:
        structures: large structures in drawing order.
        medium: medium object groups.
        slots: small-object kind -> candidate placements.
    """

    structures: tuple[Structure, ...]
    medium: tuple[ObjectGroup, ...]
    slots: dict[str, tuple[Placement, ...]]


# --- dihedral transforms: layouts are written once, facing one way, then rotated/flipped ---

_ROT_REGION = {"top": "right", "right": "bottom", "bottom": "left", "left": "top", "centre": "centre"}
_FLIP_REGION = {"left": "right", "right": "left", "top": "top", "bottom": "bottom", "centre": "centre"}


def _map_point(p: Point, rot: int, flip: bool) -> Point:
    x, y = p
    for _ in range(rot):  # 90 degrees clockwise on screen
        x, y = 1.0 - y, x
    return (1.0 - x, y) if flip else (x, y)


def _map_angle(a: float, rot: int, flip: bool) -> float:
    a += 90.0 * rot
    return (180.0 - a) % 360.0 if flip else a % 360.0


def _map_region(r: str, rot: int, flip: bool) -> str:
    for _ in range(rot):
        r = _ROT_REGION[r]
    return _FLIP_REGION[r] if flip else r


def _map_box(b: Box, rot: int, flip: bool) -> Box:
    (x0, y0), (x1, y1) = _map_point(b[:2], rot, flip), _map_point(b[2:], rot, flip)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def transform_placement(p: Placement, rot: int, flip: bool) -> Placement:
    """Rotate ``p`` by ``rot`` quarter turns clockwise, then mirror left-right if ``flip``."""
    return replace(
        p,
        area=_map_box(p.area, rot, flip),
        region=_map_region(p.region, rot, flip),
        angle=_map_angle(p.angle, rot, flip),
    )


def transform_structure(s: Structure, rot: int, flip: bool) -> Structure:
    """Rotate/mirror a structure like :func:`transform_placement`."""
    return replace(
        s,
        points=tuple(_map_point(p, rot, flip) for p in s.points),
        angle=_map_angle(s.angle, rot, flip),
    )


def transform_group(g: ObjectGroup, rot: int, flip: bool) -> ObjectGroup:
    """Rotate/mirror an object group like :func:`transform_placement`."""
    return replace(g, place=transform_placement(g.place, rot, flip))
