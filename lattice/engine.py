"""The compiled runtime behind the public API: builds the decode program once per Model and runs
sessions through lattice._runtime (the Cython token loop over a backend's C interface)."""
from __future__ import annotations

from ._runtime import Runtime  # ImportError when the extension is not built: api.py falls back
from .program import build


class RuntimeEngine:
    name = "cpu"

    def __init__(self, ckpt, quant=None, context=4096, threads=None):
        self.program = build(ckpt, quant=quant, context=context)
        self.runtime = Runtime(self.program, n_threads=threads)

    def new_state(self):
        return _RuntimeState(self.runtime.new_state())

    def generate(self, state, prompt_ids, max_tokens, stop_ids, params, on_token):
        res = self.runtime.generate(state.st, prompt_ids, max_tokens, stop_ids=stop_ids,
                                    sampling=params, on_token=on_token)
        return (res["finish_reason"], res["reused_tokens"], res["prefill_seconds"],
                res["decode_seconds"])

    def logits(self, state, ids):
        return self.runtime.logits(state.st, ids)


class _RuntimeState:
    def __init__(self, st):
        self.st = st

    @property
    def tokens(self):
        return self.st.history

    def reset(self):
        self.st.reset()
