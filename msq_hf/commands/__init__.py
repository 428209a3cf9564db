"""The ``msq-hf`` console script: :mod:`~msq_hf.commands.main` (parser, entry point, errors) and one module
per command (:mod:`~msq_hf.commands.train`, :mod:`~msq_hf.commands.inspect`, :mod:`~msq_hf.commands.export`,
:mod:`~msq_hf.commands.report`), sharing :mod:`~msq_hf.commands.common`. ``train`` declares its options in a
light module of their own, :mod:`~msq_hf.commands.train_args` (no torch, for ``msq-hf train --help``)."""
