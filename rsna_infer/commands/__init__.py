"""One module per ``rsna-infer`` command: ``add_arguments(parser)`` and ``run_cli(args) -> int``."""
