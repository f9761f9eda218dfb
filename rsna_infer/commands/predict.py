"""``rsna-infer predict``: placeholder until the run split lands (the command lives in the engine today)."""

from __future__ import annotations

from ..inference.engine import add_arguments, run_cli

__all__ = ["add_arguments", "run_cli"]
