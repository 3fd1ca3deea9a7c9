"""Subcommands beyond models / fusions register here: each entry is ``register(sub, common)``."""
from __future__ import annotations

REGISTER: list = []
