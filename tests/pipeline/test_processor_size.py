"""The image processor an export carries produces the training input size (transformers 5.x ``SizeDict`` too).

transformers 5 stores a processor's ``size``/``crop_size`` as a ``SizeDict`` (attributes, not a ``Mapping``); a
processor left at its 224 px default would feed ``pipeline("image-classification")`` images the network never saw.
"""

from __future__ import annotations

import numpy as np
from transformers import ViTConfig, ViTForImageClassification

from msq_hf.pipeline.model import ModelSpec, image_processor


def test_processor_is_set_to_the_training_size() -> None:
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3)  # fmt: skip
    processor = image_processor(
        ModelSpec(kind="config", ref="tiny", image_size=32), ViTForImageClassification(config), 32
    )
    pixels = processor(np.zeros((48, 40, 3), dtype=np.uint8), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (32, 32)
