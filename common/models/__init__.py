"""Per-modality encoders, masked fusion and classification heads, built from config.

Public API::

    model = build_model(config=ModelConfig(), schema=schema, ways=5)
    params = initial_parameters(model, generator=torch.Generator().manual_seed(0))
    logits = torch.func.functional_call(model, params, (inputs, masks))  # [B, ways]
"""

from common.models.build import (
    MultimodalModel,
    build_model,
    count_parameters,
    initial_parameters,
    param_bytes,
)
from common.models.encoders import (
    ImageEncoder,
    SeriesEncoder,
    SpectrogramEncoder,
    TokenEncoder,
    build_encoder,
)
from common.models.fusion import (
    FUSIONS,
    AttentionFusion,
    ClassifierHead,
    EarlyFusion,
    LateFusion,
    build_fusion,
)

__all__ = [
    "FUSIONS",
    "AttentionFusion",
    "ClassifierHead",
    "EarlyFusion",
    "ImageEncoder",
    "LateFusion",
    "MultimodalModel",
    "SeriesEncoder",
    "SpectrogramEncoder",
    "TokenEncoder",
    "build_encoder",
    "build_fusion",
    "build_model",
    "count_parameters",
    "initial_parameters",
    "param_bytes",
]
