"""The ``msq-hf`` console script."""
