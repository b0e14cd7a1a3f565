"""The public Python API: load a model once, open sessions, generate or stream.

    import lattice
    model = lattice.load("smollm2-135m")              # path, alias or Hugging Face repo id
    chat = model.session()                            # its own KV cache / recurrent state
    print(chat.generate([{"role": "user", "content": "What is 12 times 12?"}]).text)
    for piece in chat.stream("Once upon a time", max_tokens=32, temperature=0.8, seed=1):
        print(piece, end="", flush=True)

A Model is immutable and shared (weights, tokenizer, compiled program); a Session owns the mutable
state of one sequence. No global state: several models and sessions can live in one process.
Thread safety: one Session must be used by one thread at a time; different sessions of the same
model may generate concurrently from different threads.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import BackendError, ContextLengthError, TokenizerError
from .hub import resolve_model
from .sampling import SamplingParams, sample

BACKENDS = ("auto", "cpu", "cuda", "metal", "reference")


@dataclass
class Generation:
    """The result of Session.generate (and Session.last after a stream)."""
    text: str
    tokens: list                       # generated token ids (without the stop token)
    prompt_tokens: int                 # tokens in the prompt
    reused_tokens: int                 # prompt tokens whose state came from the session's cache
    finish_reason: str                 # "stop" (EOS or stop string), "length", "context", "interrupted"
    logprobs: list | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of prefill; decode time covers the rest
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


def load(model=None, backend: str = "auto", quant: str | None = None, context: int = 4096,
         threads: int | None = None, quiet: bool = True) -> "Model":
    """Load a model: a local folder (Hugging Face / MLX) or .gguf file, an alias, or a repo id.

    backend: where the compiled runtime runs the model.
      "auto": Metal on macOS on Apple silicon when the bridge is built, else CUDA when an NVIDIA
        GPU and nvcc are usable, else the CPU, else (extension not built) the numpy reference;
      "cpu": the C kernels of the compiled runtime;
      "cuda": an NVIDIA GPU (the bridge is compiled with nvcc on first use);
      "metal": the GPU of an Apple silicon Mac;
      "reference": the numpy reference decoder (slow: the oracle).
    A backend that was named but cannot run here raises BackendError saying why.
    quant: None keeps the checkpoint's precision where the runtime supports it exactly;
    "q8" / "q4" requantize weights to Lattice's block formats.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if quant not in (None, "q8", "q4", "f16"):
        raise BackendError(f"unknown quant {quant!r}; choose q8, q4, f16 or None")
    if not isinstance(context, int) or context < 16:
        raise ContextLengthError(f"context must be an integer >= 16, got {context!r}")
    return Model(resolve_model(model, quiet=quiet), backend, quant, context, threads)


class Model:
    def __init__(self, path, backend, quant, context, threads):
        from .formats import open_checkpoint
        from .models import check_weights
        from .tokenizer import Tokenizer
        t0 = time.perf_counter()
        self.path = path
        ckpt = open_checkpoint(path)
        self.config = ckpt.config
        check_weights(ckpt)
        self.tokenizer = Tokenizer.from_checkpoint(ckpt)
        ckpt.metadata = {}      # the GGUF vocabulary lists (tens of MB) are the tokenizer's now
        self.context = min(context, self.config.max_position_embeddings or context)
        self._engine = _make_engine(ckpt, backend, quant, self.context, threads)
        self.backend = self._engine.name
        if self.backend != "reference":
            # the program holds its own converted weights: the files need not stay mapped, and
            # the checkpoint is not kept
            ckpt.release()
        self.load_seconds = time.perf_counter() - t0

    def session(self) -> "Session":
        return Session(self)

    def generate(self, prompt, **kwargs) -> Generation:
        """One-shot generation in a fresh session."""
        return self.session().generate(prompt, **kwargs)

    def __repr__(self):
        return (f"<lattice.Model {self.config.model_type} {os.path.basename(str(self.path))} "
                f"backend={self.backend} context={self.context}>")


def _make_engine(ckpt, backend, quant, context, threads):
    if backend == "reference":
        return ReferenceEngine(ckpt, context)
    try:
        from .engine import RuntimeEngine
    except ImportError as e:
        if backend != "auto":
            raise BackendError(f"the compiled runtime (lattice._runtime) is not available: {e}") from None
        return ReferenceEngine(ckpt, context)
    return RuntimeEngine(ckpt, backend, quant=quant, context=context, threads=threads)


class ReferenceEngine:
    """Runs the numpy reference decoder: correct, slow. The oracle the runtime is tested against."""
    name = "reference"

    def __init__(self, ckpt, context):
        self.ckpt, self.context = ckpt, context

    def new_state(self):
        from .reference import ReferenceDecoder
        return _RefState(ReferenceDecoder(self.ckpt))

    def logits(self, state, ids):
        state.reset()
        return state.feed(ids)

    def generate(self, state, prompt_ids, max_tokens, stop_ids, params: SamplingParams, on_token):
        """Prefill prompt_ids (reusing the cached prefix), then sample up to max_tokens tokens.
        on_token(token, logprob) -> False stops. Returns (finish_reason, reused, t_prefill, t_decode)."""
        reused = state.prepare(prompt_ids)
        rng = np.random.default_rng(params.seed)
        counts = np.zeros(self.ckpt.config.vocab_size, np.int64)
        np.add.at(counts, np.asarray(prompt_ids, np.int64), 1)
        t0 = time.perf_counter()
        logits = state.feed(prompt_ids[reused:])[-1]
        t_prefill, t1 = time.perf_counter() - t0, time.perf_counter()
        finish = "length"
        for i in range(max_tokens):
            tok, lp = sample(logits, params, rng, counts)
            if tok in stop_ids:
                finish = "stop"
                break
            if on_token(tok, lp) is False:
                finish = "stop"
                break
            if i == max_tokens - 1:
                break
            if len(state.tokens) >= self.context:
                finish = "context"
                break
            counts[tok] += 1
            logits = state.feed([tok])[-1]
        return finish, reused, t_prefill, time.perf_counter() - t1


class _RefState:
    def __init__(self, decoder):
        self.decoder, self.tokens = decoder, []

    def prepare(self, prompt_ids) -> int:
        """Keep the cached state when the prompt extends it exactly (works for recurrent layers
        too, which cannot rewind); otherwise start over. Returns the number of reused tokens."""
        n = len(self.tokens)
        if 0 < n < len(prompt_ids) and list(prompt_ids[:n]) == self.tokens:
            return n
        self.decoder.reset()
        self.tokens = []
        return 0

    def feed(self, ids):
        ids = list(ids)
        logits = self.decoder.prefill(ids) if len(ids) > 1 else self.decoder.step(ids[0])[None]
        self.tokens += ids
        return logits

    def reset(self):
        self.decoder.reset()
        self.tokens = []


class Session:
    """One sequence's state on a shared Model. Multi-turn chat reuses the cached prefix: only the
    tokens that are new since the last call are prefilled."""

    def __init__(self, model: Model):
        self.model = model
        self._state = model._engine.new_state()
        self.last: Generation | None = None

    @property
    def position(self) -> int:
        return len(self._state.tokens)

    def reset(self):
        self._state.reset()

    def counters(self) -> dict:
        """The runtime's counters since the session was created (tokens, steps, dispatches per
        decode step, submissions, backend and device API calls, per-token ratios); empty for the
        numpy reference engine, which has no runtime."""
        counters = getattr(self._state, "counters", None)
        return counters() if counters else {}

    def logits(self, ids) -> np.ndarray:
        """Teacher-forced logits [T, vocab] (f32) of token ids from a fresh context (the session
        starts over). For evaluation: perplexity, KL against a reference."""
        ids = self.encode_prompt(list(ids))
        if not 0 < len(ids) <= self.model.context:
            raise ContextLengthError(f"{len(ids)} tokens do not fit the context of {self.model.context}")
        return self.model._engine.logits(self._state, ids)

    def encode_prompt(self, prompt) -> list:
        """str: raw text (BOS added as the model wants); list of dicts: chat messages rendered with
        the model's chat template; list of ints: token ids as they are."""
        tok = self.model.tokenizer
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            # like transformers: the template writes any BOS itself, so none is added here
            return tok.encode(tok.apply_chat_template(list(prompt), add_generation_prompt=True),
                              add_bos=False)
        ids = [int(i) for i in np.asarray(prompt).ravel()] if len(prompt) else []
        bad = [i for i in ids if not 0 <= i < self.model.config.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is out of range for vocab size "
                                 f"{self.model.config.vocab_size}")
        return ids

    def generate(self, prompt, **kwargs) -> Generation:
        for _ in self.stream(prompt, **kwargs):
            pass
        return self.last

    def stream(self, prompt, max_tokens: int = 256, stop=None, ignore_eos: bool = False,
               logprobs: bool = False, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed=None):
        """Yield text pieces as they are produced; the full Generation is in self.last after."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty,
                                presence_penalty, frequency_penalty, seed)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        ids = self.encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        ctx = self.model.context
        if len(ids) >= ctx:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens, the context holds {ctx}: "
                                     f"shorten it or load the model with a larger context=")
        max_tokens = min(max_tokens, ctx - len(ids))
        stop_ids = () if ignore_eos else tuple(self.model.tokenizer.eos_ids)
        yield from _StreamRun(self, ids, max_tokens, stop_ids, stops, params, logprobs).pieces()


class _StreamRun:
    """Runs the engine in a worker thread and turns its tokens into text pieces here, holding back
    text that may be the start of a stop string. Ctrl-C in the consumer stops the engine within
    one step and leaves the session usable."""

    def __init__(self, session, ids, max_tokens, stop_ids, stops, params, want_logprobs):
        from .tokenizer import StreamingDetokenizer
        self.s, self.ids, self.max_tokens = session, ids, max_tokens
        self.stop_ids, self.stops, self.params = stop_ids, stops, params
        self.detok = StreamingDetokenizer(session.model.tokenizer)
        self.tokens, self.logprobs = [], ([] if want_logprobs else None)
        self.q = queue.Queue()
        self.cancel = threading.Event()

    def _on_token(self, tok, lp):
        if self.cancel.is_set():
            return False
        self.q.put(("token", tok, lp))
        return True

    def _work(self):
        try:
            res = self.s.model._engine.generate(self.s._state, self.ids, self.max_tokens,
                                                self.stop_ids, self.params, self._on_token)
            self.q.put(("done", res, None))
        except BaseException as e:  # handed to the consumer thread
            self.q.put(("error", e, None))

    def pieces(self):
        worker = threading.Thread(target=self._work, daemon=True)
        worker.start()
        text, emitted, finish = "", 0, None
        hold = max((len(s) for s in self.stops), default=0)
        try:
            while True:
                kind, a, b = self.q.get()
                if kind == "error":
                    raise a
                if kind == "done":
                    finish, reused, t_pre, t_dec = a
                    break
                if self.cancel.is_set():  # a stop string ended the text; drain what is in flight
                    continue
                self.tokens.append(a)
                if self.logprobs is not None:
                    self.logprobs.append(b)
                text += self.detok.add(a)
                cut = _find_stop(text, self.stops, emitted)
                if cut is not None:
                    text = text[:cut]
                    self.cancel.set()
                    finish = "stop"
                safe = len(text) if cut is not None else max(emitted, len(text) - hold + 1 if hold else len(text))
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
        except BaseException:
            self.cancel.set()
            worker.join()
            self._finish("interrupted", text, 0, 0.0, 0.0)
            raise
        if self.cancel.is_set():
            finish = "stop"
        else:
            text += self.detok.flush()
        if len(text) > emitted:
            yield text[emitted:]
        worker.join()
        self._finish(finish, text, reused, t_pre, t_dec)

    def _finish(self, finish, text, reused, t_pre, t_dec):
        self.s.last = Generation(text, self.tokens, len(self.ids), reused, finish, self.logprobs,
                                 t_pre, t_dec)


def _find_stop(text, stops, start):
    """Index where the earliest stop string begins in text (searching from near `start`), or None."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best
