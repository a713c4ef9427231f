"""Image and text encoders ("towers") behind two decorator registries.

Build one from the spec a user types::

    img = create_image_encoder("efficientnet-lite0", frozen=True, pool="multi")
    img = create_image_encoder("resnet50@/weights/resnet50.safetensors")
    img = create_image_encoder("clip:ViT-B-32@/ckpt/RS5M_ViT-B-32_RET-2.pt")
    txt = create_text_encoder("minilm-l6")
    txt = create_text_encoder("hf:/models/bert-base-uncased", pool="cls")
    txt = create_text_encoder("clip:ViT-B-32@openai")

Specs are ``name[@weights]`` or ``scheme:arch[@weights]`` (schemes: ``clip:``, ``hf:``), where
``weights`` is a pretrained tag or a local checkpoint path. Every encoder follows
:mod:`rsitr.models.encoders.base`: ``pooled``/``tokens``/``mask`` (and ``maps`` for images),
``num_features``, ``token_dim``, its preprocessing, ``set_frozen`` and ``identity()``.
"""

from rsitr.models.encoders._factory import (
    EncoderSpec,
    create_image_encoder,
    create_text_encoder,
    list_image_encoders,
    list_text_encoders,
    parse_spec,
    register_image_encoder,
    register_text_encoder,
)
from rsitr.models.encoders.base import (
    Encoder,
    ImageEncoder,
    ImageOutput,
    TextEncoder,
    TextOutput,
    masked_mean,
)

__all__ = [
    "Encoder",
    "EncoderSpec",
    "ImageEncoder",
    "ImageOutput",
    "TextEncoder",
    "TextOutput",
    "create_image_encoder",
    "create_text_encoder",
    "list_image_encoders",
    "list_text_encoders",
    "masked_mean",
    "parse_spec",
    "register_image_encoder",
    "register_text_encoder",
]

# The family modules register themselves on import (timm's layout: the registry is a leaf, the
# package imports the model files).
from rsitr.models.encoders import (  # noqa: E402, F401
    clip,
    efficientnet,
    gswin,
    hf_text,
    minilm,
    timm_backbones,
    tiny,
)
