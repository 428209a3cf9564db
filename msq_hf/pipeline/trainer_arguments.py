"""``TrainingArguments`` as an argument group of a front end (the recipes parse them next to the pipeline's own).

Kept apart from :mod:`msq_hf.pipeline.arguments`: ``transformers.TrainingArguments`` imports torch, and
``msq-hf train --help`` reads those dataclasses without it.
"""

from __future__ import annotations

from transformers import TrainingArguments


class GroupedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` under their own ``--help`` heading, so a front end's own groups come first.

    (``HfArgumentParser`` puts a dataclass without ``_argument_group_name`` into the parser's first group.)
    """

    _argument_group_name = "training (transformers.TrainingArguments)"


__all__ = ["GroupedTrainingArguments"]
