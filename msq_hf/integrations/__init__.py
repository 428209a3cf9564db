"""Framework glue: the transformers ``HfQuantizer`` for ``quant_method="msq"`` and the timm load path."""
