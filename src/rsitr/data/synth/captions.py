"""Caption grammar: RSICD-style sentences about the scene, its objects, counts, colours and layout.

Every caption is lower case and ends in ``" ."``. Of the five captions of a scene, four name the
count and colour of the primary small-object group (two of them also its position), and when a
secondary group exists two name its count and colour; so siblings, which differ in one small-object
attribute, get different captions. Scenes without a secondary group sometimes get a generic
scene-level sentence (``"this is an airport ."``) that repeats across images, as in RSICD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from rsitr.data.synth.scenes import get_scene_class
from rsitr.data.synth.spec import ObjectGroup, SceneSpec

T = TypeVar("T")

#: Probability that a scene without a secondary group gets one generic sentence.
GENERIC_PROB = 0.5

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {  # kind -> (singular, plural) paraphrases
    "plane": (("plane", "planes"), ("airplane", "airplanes"), ("aircraft", "aircraft")),
    "car": (("car", "cars"), ("vehicle", "vehicles")),
    "truck": (("truck", "trucks"), ("lorry", "lorries")),
    "ship": (("ship", "ships"), ("vessel", "vessels")),
    "boat": (("boat", "boats"), ("small boat", "small boats")),
    "tree": (("tree", "trees"),),
    "umbrella": (("umbrella", "umbrellas"), ("parasol", "parasols")),
    "train": (("train", "trains"),),
    "terminal": (("terminal", "terminals"), ("terminal building", "terminal buildings")),
    "building": (("building", "buildings"),),
    "warehouse": (("warehouse", "warehouses"), ("factory building", "factory buildings")),
    "hotel": (("hotel", "hotels"), ("building", "buildings")),
    "station": (("station building", "station buildings"),),
    "grandstand": (("grandstand", "grandstands"), ("stand", "stands")),
    "house": (("house", "houses"),),
    "farmhouse": (("farmhouse", "farmhouses"), ("house", "houses")),
    "cabin": (("cabin", "cabins"), ("hut", "huts")),
    "pavilion": (("pavilion", "pavilions"),),
    "tank": (("storage tank", "storage tanks"), ("oil tank", "oil tanks")),
    "pier": (("pier", "piers"), ("dock", "docks")),
}
_ROOFED = {"house", "farmhouse", "cabin", "warehouse"}  # "houses with red roofs"

_VERBS: dict[str, tuple[tuple[str, str], ...]] = {  # kind -> (singular, plural) paraphrases
    "plane": (("is parked", "are parked"), ("stands", "stand")),
    "car": (("is parked", "are parked"), ("stands", "stand")),
    "truck": (("is parked", "are parked"), ("stands", "stand")),
    "ship": (("lies", "lie"), ("is anchored", "are anchored")),
    "boat": (("is floating", "are floating"), ("is sailing", "are sailing")),
    "tree": (("grows", "grow"), ("stands", "stand"), ("is planted", "are planted")),
    "umbrella": (("is set up", "are set up"), ("stands", "stand")),
    "train": (("is stopped", "are stopped"), ("stands", "stand"), ("waits", "wait")),
}

_REGIONS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "in the left part"),
    "right": ("on the right", "on the right side", "in the right part"),
    "top": ("at the top", "in the upper part", "at the top of the image"),
    "bottom": ("at the bottom", "in the lower part", "at the bottom of the image"),
    "centre": ("in the middle", "in the centre"),
}
_RELATIONS: dict[str, tuple[str, ...]] = {
    "beside": ("beside", "next to"),
    "near": ("near", "close to"),
    "along": ("along",),
    "on": ("on",),
    "in": ("in",),
}
_LANDMARKS: dict[str, tuple[str, ...]] = {  # {c}: structure colour, {n}: number of structures
    "runway": ("a long runway", "a straight runway", "a runway"),
    "parking lot": ("many parking spaces", "white parking lines"),
    "sea": ("the sea", "the blue sea"),
    "field": ("{c} fields", "fields of {c} crops"),
    "road": ("a road", "a wide road"),
    "roads": ("{n} roads", "crossing roads", "several roads"),
    "bridge": ("a {c} bridge", "a {c} bridge over the river"),
    "trees": ("dense trees", "a dense canopy", "many green trees"),
    "sand": ("a sandy beach", "yellow sand", "a long strip of sand"),
    "running track": ("a red running track", "a running track around a green field"),
    "railway tracks": ("{n} railway tracks", "{n} parallel tracks", "several railway tracks"),
    "pond": ("a pond", "a small lake", "blue water"),
}


class _Writer:
    """Picks paraphrases with one generator; methods return phrases without the final period."""

    def __init__(self, spec: SceneSpec, rng: np.random.Generator) -> None:
        self.spec, self.rng = spec, rng
        self.nouns = get_scene_class(spec.scene).nouns
        self.landmark_name = get_scene_class(spec.scene).landmark

    def pick(self, seq: Sequence[T]) -> T:
        return seq[int(self.rng.integers(len(seq)))]

    @staticmethod
    def article(word: str) -> str:
        return "an" if word[0] in "aeiou" else "a"

    def scene(self, definite: bool = False) -> str:
        noun = self.pick(self.nouns)
        if definite:
            return f"{self.pick(('the', 'this'))} {noun}"
        return f"{self.article(noun)} {noun}"

    def np(self, kind: str, count: int, colour: str) -> str:
        """Noun phrase with count and colour: ``three white planes``, ``an orange boat``."""
        sing, plur = self.pick(_NOUNS[kind])
        if kind in _ROOFED and self.rng.random() < 0.5:
            head = sing if count == 1 else plur
            noun, colour_part = f"{head} with {colour} {'roof' if count == 1 else 'roofs'}", ""
        else:
            noun, colour_part = (sing if count == 1 else plur), f"{colour} "
        if count == 1:
            first = f"{colour_part}{noun}"
            det = self.pick((self.article(first), "one"))
            return f"{det} {first}"
        number = _NUMBERS[count] if count < len(_NUMBERS) else "many"
        return f"{number} {colour_part}{noun}"

    def group(self, g: ObjectGroup) -> str:
        return self.np(g.kind, g.count, g.colour)

    def verb(self, g: ObjectGroup) -> str:
        return self.pick(_VERBS[g.kind])[g.count > 1]

    def be(self, g: ObjectGroup) -> str:
        return "are" if g.count > 1 else "is"

    def region(self, g: ObjectGroup) -> str:
        return self.pick(_REGIONS[g.place.region])

    def anchor(self, name: str) -> str:
        same = [m for m in self.spec.medium if m.kind == name]
        if same:
            total = sum(m.count for m in same)
            sing, plur = self.pick(_NOUNS[name])
            colour = f"{same[0].colour} " if self.rng.random() < 0.5 else ""
            return f"the {colour}{sing if total == 1 else plur}"
        return f"the {name}"

    def where(self, g: ObjectGroup, with_region: bool) -> str:
        """``beside the grey terminal at the bottom`` / ``on the left``."""
        p = g.place
        if not p.relation:
            return self.region(g)
        rel = f"{self.pick(_RELATIONS[p.relation])} {self.anchor(p.anchor)}"
        return f"{rel} {self.region(g)}" if with_region else rel

    def landmark(self) -> str:
        found = [s for s in self.spec.structures if s.name == self.landmark_name]
        colours = list(dict.fromkeys(s.colour for s in found))
        c = " and ".join(colours[:2]) if colours else ""
        n = _NUMBERS[len(found)] if len(found) < len(_NUMBERS) else "many"
        key = self.landmark_name
        if len(found) > 1 and f"{key}s" in _LANDMARKS:
            key = f"{key}s"
        return self.pick(_LANDMARKS[key]).format(c=c, n=n)

    def medium(self) -> str:
        m = self.spec.medium[0]
        total = sum(g.count for g in self.spec.medium if g.kind == m.kind)
        return self.np(m.kind, total, m.colour)

    # --- sentence templates ----------------------------------------------------------------------

    def located(self, g: ObjectGroup) -> str:
        """``three white planes are parked beside the terminal at the bottom``."""
        return f"{self.group(g)} {self.verb(g)} {self.where(g, with_region=True)}"

    def region_first(self, g: ObjectGroup) -> str:
        """``on the left there are three white planes``."""
        if self.rng.random() < 0.5:
            return f"{self.region(g)} there {self.be(g)} {self.group(g)}"
        return f"there {self.be(g)} {self.group(g)} {self.region(g)}"

    def in_scene(self, g: ObjectGroup) -> str:
        """``three white planes are parked beside the terminal in this airport``."""
        # avoid "in the parking lot in this parking lot"
        anchor_is_scene = g.place.anchor in self.nouns
        where = self.region(g) if anchor_is_scene else self.where(g, with_region=False)
        if self.rng.random() < 0.5:
            return f"{self.group(g)} {self.verb(g)} {where} in {self.scene(True)}"
        return f"there {self.be(g)} {self.group(g)} {where} in {self.scene(True)}"

    def scene_with(self, g: ObjectGroup) -> str:
        """``an airport with a long runway and three white planes``."""
        return f"{self.scene()} with {self.landmark()} and {self.group(g)}"

    def two_groups(self, g: ObjectGroup, h: ObjectGroup) -> str:
        """``three white planes and two red cars are in the airport``."""
        if self.rng.random() < 0.5:
            return f"{self.group(g)} and {self.group(h)} are in {self.scene(True)}"
        return f"{self.group(g)} {self.where(g, False)} and {self.group(h)} {self.where(h, False)}"

    def scene_level(self) -> str:
        """``an airport with a long runway and a grey terminal`` (no small objects)."""
        if not self.spec.medium or self.rng.random() < 0.4:
            return f"{self.scene()} with {self.landmark()}"
        return f"{self.scene()} with {self.landmark()} and {self.medium()}"

    def generic(self) -> str:
        """``this is an airport``: repeats across images of a class."""
        return self.pick(("this is {}", "it is {}", "{}")).format(self.scene())


def _finish(text: str) -> str:
    return " ".join(text.lower().split()) + " ."


def captions_for(spec: SceneSpec, rng: np.random.Generator, num: int = 5) -> list[str]:
    """Write ``num`` captions for ``spec`` (lower case, ending in ``" ."``).

    Args:
        spec: the scene.
        rng: picks templates and paraphrases.
        num: number of captions; the grammar guarantees the properties above for ``num == 5``.

    Returns:
        The captions, distinct when the grammar allows.
    """
    w = _Writer(spec, rng)
    g = spec.small[0]
    h = spec.small[1] if len(spec.small) > 1 else None
    plan: list[Callable[[], str]] = [
        lambda: w.located(g),
        lambda: w.region_first(g),
        lambda: w.pick((w.scene_with, w.in_scene))(g),
    ]
    if h is not None:
        plan += [lambda: w.two_groups(g, h), lambda: w.pick((w.located, w.region_first))(h)]
    else:
        plan.append(lambda: w.pick((w.in_scene, w.scene_with))(g))
        plan.append(w.generic if rng.random() < GENERIC_PROB else w.scene_level)
    while len(plan) < num:
        plan.append(lambda: w.located(g))
    captions: list[str] = []
    for make in plan[:num]:
        text = _finish(make())
        for _ in range(8):  # re-draw paraphrases to avoid duplicates within one image
            if text not in captions:
                break
            text = _finish(make())
        captions.append(text)
    order = rng.permutation(len(captions))
    return [captions[i] for i in order]
