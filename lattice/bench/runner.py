"""The measurement protocol, run for one engine (in a fresh worker process by default).

Per measured run: T(N1) and T(N2) from the same decode prompt (their order alternates between runs so
slow drift does not favour either), and the time to first token of a P-token prompt. Decode tok/s of
the run = (N2 - N1) / (T(N2) - T(N1)); prefill tok/s = P / TTFT. Warm-up runs are discarded.
With a load, the same runs are repeated while the load processes run.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, asdict, field

from .engines import Engine, EngineUnavailable, make_engine, pick_model_file
from .load import LoadProcesses
from .stats import BenchError, degradation_pct, slope_rates, summarize


@dataclass
class Settings:
    n1: int = 64
    n2: int = 512
    warmup: int = 2
    runs: int = 15
    pp: int = 512               # prefill prompt length
    prompt_tokens: int = 16     # decode prompt length
    threads: int = 1
    load: int = 0
    load_device: str = "cpu"
    load_duty: float = 0.02
    load_period_ms: float = 10.0
    load_python: str = ""       # interpreter of the load processes (one with torch for cuda) [this one]

    def validate(self):
        if not (1 <= self.n1 < self.n2):
            raise BenchError(f"need 1 <= --n1 < --n2, got n1={self.n1}, n2={self.n2}")
        for name in ("runs", "pp", "prompt_tokens", "threads"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
        if self.runs < 2:
            raise BenchError(f"--runs must be >= 2 for a confidence interval, got {self.runs}")

    @property
    def context(self) -> int:
        return max(self.prompt_tokens + self.n2, self.pp + 1) + 16


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    """A fixed prompt of n token ids spread over the vocabulary, the same for every engine with the
    same vocabulary (the first ids, often special tokens, are skipped)."""
    lo = min(100, vocab_size // 4)
    span = vocab_size - lo - 1
    return [lo + (7919 * i + 13) % span for i in range(n)]


def _timed(engine: Engine, ids: list[int], n: int) -> float:
    t = engine.generate(ids, n)
    if t.tokens != n:
        raise BenchError(f"{engine.spec} produced {t.tokens} tokens when asked for {n}; "
                         "the slope would be wrong")
    return t.seconds


def _phase(engine: Engine, s: Settings, decode_prompt, prefill_prompt, runs: int) -> dict:
    t1, t2, tp = [], [], []
    for r in range(runs):
        if r % 2 == 0:
            t1.append(_timed(engine, decode_prompt, s.n1))
            t2.append(_timed(engine, decode_prompt, s.n2))
        else:
            t2.append(_timed(engine, decode_prompt, s.n2))
            t1.append(_timed(engine, decode_prompt, s.n1))
        tp.append(_timed(engine, prefill_prompt, 1))
    return {"times_n1": t1, "times_n2": t2, "times_prefill": tp}


def summarize_phase(raw: dict, s: Settings) -> dict:
    rates = slope_rates(s.n1, s.n2, raw["times_n1"], raw["times_n2"])
    return {**raw, "decode_tps": rates, "prefill_tps": [s.pp / t for t in raw["times_prefill"]],
            "decode": summarize(rates).to_dict(),
            "prefill": summarize([s.pp / t for t in raw["times_prefill"]]).to_dict(),
            "ttft_ms": summarize([t * 1e3 for t in raw["times_prefill"]]).to_dict()}


def measure_engine(engine: Engine, model_path: str, s: Settings) -> dict:
    """Load, warm up, measure (and again under load when s.load > 0). Returns the engine's record."""
    s.validate()
    t0 = time.perf_counter()
    engine.load(model_path, s.threads, s.context)
    record = {"engine": engine.spec, "status": "ok", "model_file": model_path,
              "load_s": time.perf_counter() - t0}
    try:
        vocab = engine.vocab_size()
        decode_prompt, prefill_prompt = prompt_ids(vocab, s.prompt_tokens), prompt_ids(vocab, s.pp)
        record["info"] = engine.info()
        if s.warmup:
            _phase(engine, s, decode_prompt, prefill_prompt, s.warmup)
        record["unloaded"] = summarize_phase(_phase(engine, s, decode_prompt, prefill_prompt, s.runs), s)
        if s.load:
            with LoadProcesses(s.load, s.load_device, s.load_duty, s.load_period_ms,
                               python=s.load_python or None) as lp:
                raw = _phase(engine, s, decode_prompt, prefill_prompt, s.runs)
            record["loaded"] = summarize_phase(raw, s)
            record["loaded"]["load"] = lp.summary()
            record["degradation_pct"] = {
                "decode": degradation_pct(record["unloaded"]["decode"]["median"],
                                          record["loaded"]["decode"]["median"]),
                "prefill": degradation_pct(record["unloaded"]["prefill"]["median"],
                                           record["loaded"]["prefill"]["median"])}
    finally:
        engine.close()
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def run_spec(spec: str, files: dict, s: Settings, registry: dict | None = None) -> dict:
    """Measure one engine spec in this process; a missing engine or model format becomes a skip."""
    try:
        engine = make_engine(spec, registry)
        engine.check_installed()
        path = pick_model_file(engine, files)
        return measure_engine(engine, path, s)
    except EngineUnavailable as e:
        return {"engine": spec, "status": "skipped", "reason": str(e)}


def run_in_worker(spec: str, files: dict, s: Settings, python: str | None = None) -> dict:
    """Measure one engine in a fresh Python process (`python`, e.g. a venv where only that engine is
    installed; this interpreter by default): engines do not share thread pools, allocators or memory,
    and peak RSS is the engine's own."""
    import subprocess
    job = json.dumps({"spec": spec, "files": files, "settings": asdict(s)})
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    exe = python or sys.executable
    try:
        p = subprocess.Popen([exe, "-m", "lattice.bench.runner"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    except OSError as e:
        return {"engine": spec, "status": "error", "reason": f"cannot start the worker with {exe}: {e}"}
    try:
        out, err = p.communicate(job)
    except BaseException:
        p.kill()         # Ctrl-C: the worker also got SIGINT; make sure it is gone (its loads follow it)
        p.wait()
        raise
    for line in out.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"engine": spec, "status": "error",
            "reason": f"worker exited with code {p.returncode}: {err.strip()[-3000:]}"}


def worker_main():
    job = json.loads(sys.stdin.read())
    s = Settings(**job["settings"])
    try:
        record = run_spec(job["spec"], job["files"], s)
    except Exception as e:   # reported, not raised: the other engines still run
        record = {"engine": job["spec"], "status": "error", "reason": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(record) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    worker_main()
