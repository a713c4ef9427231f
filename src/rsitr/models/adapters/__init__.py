"""Parameter-efficient adapters for frozen towers (RDB's CMAA and its symmetric baselines)."""

from rsitr.models.adapters.attention import (
    DifferentialAttention,
    HierarchicalAttention,
    SelfAttention,
    SharedInteraction,
    lambda_init_schedule,
)
from rsitr.models.adapters.bottleneck import AdapterContext, BottleneckAdapter, GatedInsertion
from rsitr.models.adapters.towers import (
    AdaptedTower,
    BertTower,
    ClipTextTower,
    ClipVisualTower,
    EfficientNetTower,
    adapted_tower,
)

__all__ = [
    "AdaptedTower",
    "AdapterContext",
    "BertTower",
    "BottleneckAdapter",
    "ClipTextTower",
    "ClipVisualTower",
    "DifferentialAttention",
    "EfficientNetTower",
    "GatedInsertion",
    "HierarchicalAttention",
    "SelfAttention",
    "SharedInteraction",
    "adapted_tower",
    "lambda_init_schedule",
]
