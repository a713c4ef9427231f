"""Sampling scene specs, and *siblings*: hard negatives that differ only in small objects."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from rsitr.data.synth.scenes import SmallDef, build_layout, get_scene_class
from rsitr.data.synth.spec import ObjectGroup, Placement, SceneSpec

#: Probability that a scene has a secondary small-object group.
SECONDARY_PROB = 0.6


def _free_choices(
    d: SmallDef, slots: tuple[Placement, ...], others: list[ObjectGroup]
) -> tuple[list[Placement], list[str]]:
    """Slots and colours not used by another group of the same kind (so groups stay distinct)."""
    same = [g for g in others if g.kind == d.kind]
    free_slots = [p for p in slots if all(p != g.place for g in same)]
    colours = [c for c in d.colours if all(c != g.colour for g in same)]
    return free_slots, colours


def _described(p: Placement) -> tuple[str, str, str]:
    return (p.region, p.relation, p.anchor)


def _sample_group(
    rng: np.random.Generator, d: SmallDef, slots: tuple[Placement, ...], others: list[ObjectGroup]
) -> ObjectGroup | None:
    free_slots, colours = _free_choices(d, slots, others)
    if not free_slots or not colours:
        return None
    place = free_slots[int(rng.integers(len(free_slots)))]
    colour = colours[int(rng.integers(len(colours)))]
    count = int(rng.integers(d.counts[0], d.counts[1] + 1))
    return ObjectGroup(d.kind, count, colour, place)


def sample_scene_spec(rng: np.random.Generator, scene_class: str) -> SceneSpec:
    """Sample a scene of ``scene_class``: layout, medium objects and small-object groups.

    Args:
        rng: source of randomness; the spec is a pure function of its state.
        scene_class: one of ``SCENE_CLASSES``.

    Returns:
        The scene spec; ``small[0]`` is the class's primary small-object group.

    Raises:
        ValueError: for an unknown scene class.
    """
    cls = get_scene_class(scene_class)
    layout_seed = int(rng.integers(2**63))
    layout = build_layout(cls.name, layout_seed)
    primary = _sample_group(rng, cls.small[0], layout.slots[cls.small[0].kind], [])
    assert primary is not None, f"{cls.name}: primary small objects have no slot"
    small = [primary]
    if len(cls.small) > 1 and rng.random() < SECONDARY_PROB:
        d = cls.small[1 + int(rng.integers(len(cls.small) - 1))]
        g = _sample_group(rng, d, layout.slots[d.kind], small)
        if g is not None:
            small.append(g)
    return SceneSpec(cls.name, layout_seed, layout.structures, layout.medium, tuple(small))


def make_sibling(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """A hard negative of ``spec``: same background, structures and medium objects, one change.

    One attribute of one small-object group changes: its count, its colour or its placement
    (slot). Captions mention all three, so the sibling's captions differ from the original's.

    Args:
        spec: the scene to vary.
        rng: source of randomness.

    Returns:
        The sibling spec (same ``layout_seed``).
    """
    cls = get_scene_class(spec.scene)
    slots = build_layout(spec.scene, spec.layout_seed).slots
    small = list(spec.small)
    i = 0 if len(small) == 1 or rng.random() < 0.7 else 1
    g = small[i]
    d = next(d for d in cls.small if d.kind == g.kind)
    others = small[:i] + small[i + 1 :]
    free_slots, colours = _free_choices(d, slots[g.kind], others)
    options: dict[str, list[object]] = {
        "count": [c for c in range(d.counts[0], d.counts[1] + 1) if c != g.count],
        "colour": [c for c in colours if c != g.colour],
        # a new slot must change what captions say (region, relation or anchor)
        "place": [p for p in free_slots if _described(p) != _described(g.place)],
    }
    attrs = [a for a, v in options.items() if v]
    attr = attrs[int(rng.integers(len(attrs)))]
    values = options[attr]
    small[i] = replace(g, **{attr: values[int(rng.integers(len(values)))]})
    return replace(spec, small=tuple(small))
