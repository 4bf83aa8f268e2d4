"""Subcommands of the ``convirt`` command line, one module each."""
