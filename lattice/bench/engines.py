"""Engine adapters: one small interface over Lattice, llama.cpp, transformers and MLX.

An adapter loads a model once, then `generate(prompt_ids, n)` starts from an empty context, prefills
the prompt and produces exactly n tokens ignoring end-of-sequence, greedy, and returns how long that
took. Each adapter times its own call (after resetting state, around the engine call only), so a
synthetic engine can return exact times in tests. Engines that are not installed raise
EngineUnavailable, which the harness reports as "skipped: not installed".
"""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass

from .stats import BenchError


class EngineUnavailable(BenchError):
    """The engine's package is not installed, or cannot run this model file / device here."""


@dataclass
class Timing:
    seconds: float          # wall time of the call: prefill + (tokens - 1) decode steps + sampling
    tokens: int             # tokens the engine actually produced


class Engine:
    """Base adapter. `spec` is the command-line name, e.g. "lattice:cpu" or "transformers:bf16"."""
    kind = ""
    formats: tuple = ()     # model file formats it reads, in order of preference: "gguf", "hf"
    package = ""            # import name that must be present

    def __init__(self, spec: str, options: list[str]):
        self.spec, self.options = spec, options

    def check_installed(self):
        if self.package and importlib.util.find_spec(self.package) is None:
            raise EngineUnavailable(f"not installed ({self.package} is missing)")

    def load(self, model_path: str, threads: int, context: int):
        raise NotImplementedError

    def vocab_size(self) -> int:
        raise NotImplementedError

    def generate(self, prompt_ids: list[int], n: int) -> Timing:
        raise NotImplementedError

    def prefill(self, prompt_ids: list[int]) -> Timing:
        """Time to first token of the prompt (prefill plus producing one token)."""
        return self.generate(prompt_ids, 1)

    def info(self) -> dict:
        """Versions, backend, precision, device: recorded with every result."""
        return {}

    def counters(self) -> dict | None:
        """The engine's own cumulative counters (Lattice: its runtime's State.counters()), or None."""
        return None

    def close(self):
        pass


def _version(dist: str) -> str | None:
    from importlib.metadata import version, PackageNotFoundError
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


class LatticeEngine(Engine):
    """lattice.load(path, backend=...) -> model.session() -> session.generate(ids, ignore_eos=True).
    Options: the backend (cpu, cuda, metal, reference, ...), then an optional quant (q8, q4, f16), and
    "eager" (cuda: kernel launches instead of graph replay, the ablation), so that the ablation can
    run beside the engine in one bench run."""
    kind, formats, package = "lattice", ("gguf", "hf"), "lattice"

    def load(self, model_path, threads, context):
        import lattice
        if not hasattr(lattice, "load"):
            raise EngineUnavailable("this lattice build has no lattice.load() public API")
        options = [o for o in self.options if o != "eager"]
        self.eager = len(options) < len(self.options)
        self.backend = options[0] if options else "auto"
        self.quant = options[1] if len(options) > 1 else None
        if self.eager and self.backend != "cuda":
            raise BenchError(f"{self.spec}: the eager option is the CUDA backend's ablation; "
                             "name the backend: lattice:cuda:eager")
        # the CUDA backend reads LATTICE_CUDA_EAGER when it creates a handle: set it for this load
        # only, so that other Lattice engines in the same process keep graph replay
        saved = os.environ.get("LATTICE_CUDA_EAGER")
        if self.eager:
            os.environ["LATTICE_CUDA_EAGER"] = "1"
        try:
            self.model = lattice.load(model_path, backend=self.backend, quant=self.quant, context=context,
                                      threads=threads)
            self.session = self.model.session()
        finally:
            if saved is None:
                os.environ.pop("LATTICE_CUDA_EAGER", None)
            else:
                os.environ["LATTICE_CUDA_EAGER"] = saved

    def vocab_size(self):
        return self.model.config.vocab_size

    def generate(self, prompt_ids, n):
        self.session.reset()
        t0 = time.perf_counter()
        out = self.session.generate(list(prompt_ids), max_tokens=n, ignore_eos=True)
        seconds = time.perf_counter() - t0
        if not hasattr(out, "tokens"):
            raise BenchError("lattice Session.generate() returned no .tokens; the public API changed")
        return Timing(seconds, len(out.tokens))

    def info(self):
        import lattice
        return {"version": getattr(lattice, "__version__", None), "backend": self.model.backend,
                "quant": self.quant or "as stored", "launches": "eager" if self.eager else "graph"}

    def counters(self):
        return self.session.counters() or None  # the numpy reference engine has none


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python. Option "gpu" offloads every layer (n_gpu_layers=-1)."""
    kind, formats, package = "llama.cpp", ("gguf",), "llama_cpp"

    def load(self, model_path, threads, context):
        from llama_cpp import Llama
        self.gpu = "gpu" in self.options
        self.llm = Llama(model_path=model_path, n_ctx=context, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, n_gpu_layers=-1 if self.gpu else 0,
                         logits_all=False, verbose=False, seed=0)

    def vocab_size(self):
        return self.llm.n_vocab()

    def generate(self, prompt_ids, n):
        self.llm.reset()
        count = 0
        t0 = time.perf_counter()
        # Llama.generate never stops on EOS by itself; greedy sampling, no penalties
        for _ in self.llm.generate(list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                   repeat_penalty=1.0, reset=True):
            count += 1
            if count == n:
                break
        return Timing(time.perf_counter() - t0, count)

    def info(self):
        return {"version": _version("llama_cpp_python"), "backend": "cuda" if self.gpu else "cpu",
                "quant": self._file_type()}

    def _file_type(self):
        """The GGUF's general.file_type as a name (MOSTLY_Q8_0, ...), as llama.cpp reports it."""
        code = self.llm.metadata.get("general.file_type")
        try:
            from gguf import LlamaFileType
            return LlamaFileType(int(code)).name
        except (ImportError, TypeError, ValueError):
            return code


class TransformersEngine(Engine):
    """Hugging Face transformers with torch. Options: dtype (bf16, f16, f32; default bf16), device
    (cpu, cuda; default cuda when available), then the cache: dynamic (the default) or static. A
    static cache has fixed shapes, so generate() compiles the decode step with torch.compile
    (inductor, CUDA graphs) where the model allows it; one cache of the bench's context is made at
    load and reset before each call, and load runs one short generation to compile."""
    kind, formats, package = "transformers", ("hf",), "transformers"
    DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
    CACHES = ("dynamic", "static")

    def load(self, model_path, threads, context):
        import torch
        from transformers import AutoModelForCausalLM
        opts = list(self.options)
        self.cache_kind = opts.pop() if opts and opts[-1] in self.CACHES else "dynamic"
        self.dtype = opts[0] if opts else "bf16"
        if self.dtype not in self.DTYPES:
            raise BenchError(f"transformers dtype {self.dtype!r}: use one of {', '.join(self.DTYPES)}")
        self.device = opts[1] if len(opts) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
        if len(opts) > 2 or self.device not in ("cpu", "cuda"):
            raise BenchError(f"{self.spec}: the options are a dtype, a device (cpu or cuda), then a cache "
                             f"({' or '.join(self.CACHES)})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("torch has no CUDA device here")
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, self.DTYPES[self.dtype])).to(self.device).eval()
        gc = self.model.generation_config
        gc.eos_token_id = None            # ignore EOS: always produce max_new_tokens
        gc.pad_token_id = 0
        gc.do_sample = False
        self.cache = None
        if self.cache_kind == "static":
            try:
                from transformers import StaticCache
            except ImportError:
                raise EngineUnavailable(f"transformers {_version('transformers')} has no StaticCache") from None
            self.cache = StaticCache(config=self.model.config, max_cache_len=context)
            self.generate([1, 2, 3, 4], 4)    # compiles the decode step: load time, not a run's

    def vocab_size(self):
        return self.model.config.get_text_config().vocab_size

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def generate(self, prompt_ids, n):
        ids = self.torch.tensor([list(prompt_ids)], device=self.device)
        kwargs = {}
        if self.cache is not None:        # the same buffers every call: no recompile, no re-capture
            self.cache.reset()
            kwargs["past_key_values"] = self.cache
        self._sync()
        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)
        self._sync()
        return Timing(time.perf_counter() - t0, out.shape[1] - ids.shape[1])

    def info(self):
        return {"version": _version("transformers"), "torch": _version("torch"),
                "backend": f"torch-{self.device}", "quant": self.dtype, "cache": self.cache_kind,
                # transformers compiles generate()'s decode step on its first use, as _compiled_call
                "compiled": hasattr(self.model, "_compiled_call")}


class MLXEngine(Engine):
    """MLX through mlx-lm (Apple silicon; CPU elsewhere). mlx_lm.generate.generate_step does not
    check EOS, so it yields exactly the tokens asked for."""
    kind, formats, package = "mlx", ("hf",), "mlx_lm"

    def load(self, model_path, threads, context):
        import mlx.core as mx
        from mlx_lm import load
        self.mx = mx
        self.model, self.tokenizer = load(model_path)

    def vocab_size(self):
        return self.tokenizer.vocab_size

    def generate(self, prompt_ids, n):
        from mlx_lm.generate import generate_step
        prompt = self.mx.array(list(prompt_ids))
        count = 0
        t0 = time.perf_counter()
        for tok, _ in generate_step(prompt, self.model, max_tokens=n):
            self.mx.eval(tok)
            count += 1
            if count == n:
                break
        return Timing(time.perf_counter() - t0, count)

    def info(self):
        return {"version": _version("mlx-lm"), "mlx": _version("mlx"), "backend": "mlx",
                "quant": "as stored"}


ENGINES = {cls.kind: cls for cls in (LatticeEngine, LlamaCppEngine, TransformersEngine, MLXEngine)}


def make_engine(spec: str, registry: dict | None = None) -> Engine:
    """"kind[:option[:option]]" -> adapter, e.g. "lattice:cpu:q8", "llama.cpp:gpu", "transformers:f32:cpu"."""
    registry = ENGINES if registry is None else registry
    kind, *options = spec.split(":")
    if kind not in registry:
        raise BenchError(f"unknown engine {kind!r} in {spec!r}; known: {', '.join(sorted(registry))}")
    return registry[kind](spec, options)


def pick_model_file(engine: Engine, files: dict) -> str:
    """The model file this engine reads: the first of its formats that was given."""
    for fmt in engine.formats:
        if files.get(fmt):
            return files[fmt]
    raise EngineUnavailable(f"needs a model in {' or '.join(engine.formats)} format "
                            f"(pass {' or '.join('--' + f for f in engine.formats)})")
