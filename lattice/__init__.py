"""Lattice: run language models locally, fast, from the shell and inside Python programs."""
from .errors import *  # noqa: F401,F403  (LatticeError and its subclasses are public API)

__version__ = "0.1.0"
