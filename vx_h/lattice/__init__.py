"""Lattice: run language models locally, fast, from the shell and inside Python programs.

    import lattice
    model = lattice.load("smollm2-135m")
    print(model.session().generate([{"role": "user", "content": "Hi!"}]).text)
"""
from .errors import *  # noqa: F401,F403  (LatticeError and its subclasses are public API)
from .api import Generation, Model, Session, load  # noqa: F401
from .sampling import SamplingParams  # noqa: F401

__version__ = "0.1.0"
