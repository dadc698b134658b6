"""The ``pretrain`` command and its subcommands: ``cli`` (fit, validate, test), ``prepare``, ``generate``,
``export``, ``compare`` and ``benchmark``."""
