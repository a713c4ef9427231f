"""Synthetic remote-sensing scenes with captions: the embedded dataset for quickstart and tests.

Each image is built in three layers (class-coloured noise ground, large structures, medium and
small objects) from a :class:`SceneSpec`; five RSICD-style captions name the scene, object counts,
colours and positions. Some images are *siblings* of another image that differ only in one
small-object attribute, so retrieval needs fine detail as well as the scene class.

Example:
    >>> from rsitr.data.synth import generate_scenes
    >>> summary = generate_scenes("data/synth", n=2000, size=224, seed=0)  # doctest: +SKIP
"""

from rsitr.data.synth.captions import captions_for
from rsitr.data.synth.generate import (
    IMAGE_DIR,
    JSON_NAME,
    LABELS_NAME,
    SynthSummary,
    assign_splits,
    generate_scenes,
    plan_scenes,
)
from rsitr.data.synth.render import render_scene
from rsitr.data.synth.sample import make_sibling, sample_scene_spec
from rsitr.data.synth.scenes import SCENE_CLASSES, get_scene_class
from rsitr.data.synth.spec import COLOURS, REGIONS, ObjectGroup, Placement, SceneSpec, Structure

__all__ = [
    "COLOURS",
    "IMAGE_DIR",
    "JSON_NAME",
    "LABELS_NAME",
    "REGIONS",
    "SCENE_CLASSES",
    "ObjectGroup",
    "Placement",
    "SceneSpec",
    "Structure",
    "SynthSummary",
    "assign_splits",
    "captions_for",
    "generate_scenes",
    "get_scene_class",
    "make_sibling",
    "plan_scenes",
    "render_scene",
    "sample_scene_spec",
]
