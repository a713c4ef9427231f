"""The scene classes: palette, caption nouns, small-object vocabulary and a layout function each.

:func:`build_layout` runs a class's canonical layout (:mod:`rsitr.data.synth.layouts`) and then
rotates/mirrors the whole layout, so every class appears in all eight orientations with
consistent spatial words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rsitr.data.synth import layouts as L
from rsitr.data.synth.spec import Layout, transform_group, transform_placement, transform_structure

_VEHICLE = ("white", "red", "blue", "black", "yellow", "grey")
_TREE = ("dark green", "light green", "yellow", "orange")
_BOAT = ("white", "red", "yellow", "blue", "orange")
_SHIP = ("white", "red", "blue", "grey", "orange")


@dataclass(frozen=True)
class SmallDef:
    """A kind of small object a scene may contain.

    Attributes:
        kind: object noun (``"plane"``).
        colours: allowed colour names.
        counts: inclusive ``(low, high)`` count range, at most 9.
    """

    kind: str
    colours: tuple[str, ...]
    counts: tuple[int, int]


@dataclass(frozen=True)
class SceneClass:
    """One scene class.

    Attributes:
        name: class id, also the image-file prefix; letters only (RSITMD style), so the
            ``<scene>_<index>`` prefix rule of :mod:`rsitr.data.labels` recovers it.
        nouns: caption nouns for the scene (paraphrases), first is the canonical one.
        ground: background RGB.
        ground_amp: background noise amplitude (0..255 scale).
        landmark: name of the structure that scene-level captions mention.
        small: small-object kinds; ``small[0]`` is always present, one of the rest sometimes.
        layout: canonical layout function.
    """

    name: str
    nouns: tuple[str, ...]
    ground: tuple[int, int, int]
    ground_amp: float
    landmark: str
    small: tuple[SmallDef, ...]
    layout: Callable[[np.random.Generator], Layout]


# --- the class table -----------------------------------------------------------------------------

_CLASSES = (
    SceneClass(
        "airport",
        ("airport", "airfield"),
        (150, 152, 108),
        30,
        "runway",
        (
            SmallDef("plane", ("white", "grey", "blue", "red", "yellow"), (1, 6)),
            SmallDef("car", _VEHICLE, (2, 9)),
        ),
        L.layout_airport,
    ),
    SceneClass(
        "parking",
        ("parking lot", "car park"),
        (118, 130, 100),
        25,
        "parking lot",
        (
            SmallDef("car", _VEHICLE, (2, 9)),
            SmallDef("car", _VEHICLE, (2, 9)),
            SmallDef("tree", _TREE, (3, 9)),
        ),
        L.layout_parking,
    ),
    SceneClass(
        "port",
        ("harbour", "port"),
        (150, 146, 136),
        25,
        "sea",
        (
            SmallDef("ship", _SHIP, (1, 6)),
            SmallDef("boat", _BOAT, (1, 5)),
            SmallDef("truck", _VEHICLE, (2, 6)),
        ),
        L.layout_port,
    ),
    SceneClass(
        "farmland",
        ("farmland", "farm"),
        (118, 140, 80),
        25,
        "field",
        (SmallDef("tree", _TREE, (2, 9)), SmallDef("truck", _VEHICLE, (1, 4))),
        L.layout_farmland,
    ),
    SceneClass(
        "residential",
        ("residential area", "neighbourhood"),
        (112, 130, 92),
        25,
        "road",
        (
            SmallDef("car", _VEHICLE, (1, 8)),
            SmallDef("car", _VEHICLE, (1, 8)),
            SmallDef("tree", _TREE, (2, 8)),
        ),
        L.layout_residential,
    ),
    SceneClass(
        "bridge",
        ("river crossing", "riverside area"),
        (100, 130, 80),
        30,
        "bridge",
        (SmallDef("car", _VEHICLE, (1, 6)), SmallDef("boat", _BOAT, (1, 4)), SmallDef("tree", _TREE, (3, 9))),
        L.layout_bridge,
    ),
    SceneClass(
        "forest",
        ("forest", "woodland"),
        (38, 76, 40),
        25,
        "trees",
        (SmallDef("car", _VEHICLE, (1, 6)), SmallDef("car", _VEHICLE, (1, 4))),
        L.layout_forest,
    ),
    SceneClass(
        "beach",
        ("beach", "seaside"),
        (92, 130, 72),
        25,
        "sand",
        (
            SmallDef("umbrella", ("red", "blue", "yellow", "white", "orange", "green"), (2, 9)),
            SmallDef("boat", _BOAT, (1, 5)),
        ),
        L.layout_beach,
    ),
    SceneClass(
        "playground",
        ("playground", "stadium", "sports ground"),
        (128, 132, 118),
        20,
        "running track",
        (SmallDef("car", _VEHICLE, (2, 9)), SmallDef("tree", _TREE, (3, 8))),
        L.layout_playground,
    ),
    SceneClass(
        "industrial",
        ("industrial area", "factory"),
        (140, 138, 130),
        25,
        "road",
        (SmallDef("truck", _VEHICLE, (1, 6)), SmallDef("car", _VEHICLE, (2, 8))),
        L.layout_industrial,
    ),
    SceneClass(
        "railwaystation",
        ("railway station", "train station"),
        (128, 120, 108),
        20,
        "railway track",
        (
            SmallDef("train", ("red", "blue", "white", "yellow", "green"), (1, 3)),
            SmallDef("car", _VEHICLE, (2, 9)),
        ),
        L.layout_railwaystation,
    ),
    SceneClass(
        "pond",
        ("park", "green park"),
        (90, 145, 70),
        25,
        "pond",
        (SmallDef("boat", _BOAT, (1, 6)), SmallDef("tree", _TREE, (3, 9))),
        L.layout_pond,
    ),
)

#: Scene class table, by name.
SCENES: dict[str, SceneClass] = {c.name: c for c in _CLASSES}

#: Names of the scene classes, in a fixed order (image ``i`` gets class ``i % len``).
SCENE_CLASSES: tuple[str, ...] = tuple(SCENES)


def get_scene_class(name: str) -> SceneClass:
    """Look up a scene class by name.

    Args:
        name: one of :data:`SCENE_CLASSES`.

    Returns:
        The class definition.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    try:
        return SCENES[name]
    except KeyError:
        raise ValueError(f"unknown scene class {name!r}; known: {', '.join(SCENE_CLASSES)}") from None


def build_layout(scene: str, layout_seed: int) -> Layout:
    """Build the (rotated/mirrored) layout of ``scene``; the same seed gives the same layout.

    Args:
        scene: scene class name.
        layout_seed: seed of the layout and its orientation.

    Returns:
        The layout in image orientation.
    """
    rng = np.random.default_rng(layout_seed)
    lay = get_scene_class(scene).layout(rng)
    rot, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    return Layout(
        tuple(transform_structure(s, rot, flip) for s in lay.structures),
        tuple(transform_group(g, rot, flip) for g in lay.medium),
        {k: tuple(transform_placement(p, rot, flip) for p in v) for k, v in lay.slots.items()},
    )
