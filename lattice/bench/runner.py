"""The measurement protocol: every engine loaded once in its own worker process, measured runs
interleaved between engines.

A run of one engine: T(N1) and T(N2) from the same decode prompt (their order alternates between
runs so slow drift does not favour either), then the time to first token of a P-token prompt.
Decode tok/s of the run = (N2 - N1) / (T(N2) - T(N1)); prefill tok/s = P / TTFT.

Engines take turns run by run (run 0 of A, run 0 of B, run 1 of B, run 1 of A, ...: the engine that
goes first rotates), so a change of machine load during the measurement hits every engine alike
instead of skewing their ratio. Warm-up runs come first (interleaved the same way, discarded). With
a load, the unloaded runs bracket the loaded ones: half of them, then the same runs again while the
load processes run (one set of processes for all engines), then the other half. With
--one-at-a-time each engine instead goes through all of that alone, the others not loaded.

Each engine lives in its own process (EngineWorker; EngineHost in this process with --in-process),
which loads the model once and answers requests over a pipe, one JSON object a line:
{"op": "open", "spec", "files", "settings"} -> the record's header (or a skip);
{"op": "run", "index": r} -> {"n1", "n2", "prefill"} seconds, timed inside the worker;
{"op": "counters"} -> the engine's runtime counters (or null); {"op": "close"} -> its peak RSS.
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, asdict

from .engines import Engine, EngineUnavailable, make_engine, pick_model_file
from .load import LoadProcesses
from .stats import BenchError, degradation_pct, mean, median, slope_rates, stdev, summarize, t_quantile

# Pause between two engines' runs: an engine's worker threads may spin for a while after a call
# (OpenMP's default wait policy, ggml's thread pool polling); they go to sleep before the next
# engine is timed.
SWITCH_PAUSE_S = 0.02


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
    one_at_a_time: bool = False  # each engine measured alone on the machine (see measure())

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


class EngineHost:
    """One engine, loaded once, answering measured runs. Runs in a worker process (see serve()), or
    in the harness's own process with --in-process."""

    def __init__(self, spec: str, files: dict, s: Settings, registry: dict | None = None):
        self.spec, self.files, self.s, self.registry = spec, files, s, registry
        self.engine: Engine | None = None

    def open(self) -> dict:
        """Load the model. Returns the engine's record: status ok, or skipped (package missing, no
        model file it reads)."""
        try:
            engine = make_engine(self.spec, self.registry)
            engine.check_installed()
            path = pick_model_file(engine, self.files)
        except EngineUnavailable as e:
            return {"engine": self.spec, "status": "skipped", "reason": str(e)}
        t0 = time.perf_counter()
        engine.load(path, self.s.threads, self.s.context)
        self.engine = engine
        load_s = time.perf_counter() - t0
        vocab = engine.vocab_size()
        self.decode_prompt = prompt_ids(vocab, self.s.prompt_tokens)
        self.prefill_prompt = prompt_ids(vocab, self.s.pp)
        return {"engine": self.spec, "status": "ok", "model_file": path, "load_s": load_s, "info": engine.info()}

    def run(self, index: int) -> dict:
        """Run `index`: N1 then N2 (N2 first on odd runs), then the prefill; seconds of each."""
        s, e, ids = self.s, self.engine, self.decode_prompt
        if index % 2 == 0:
            t1 = _timed(e, ids, s.n1)
            t2 = _timed(e, ids, s.n2)
        else:
            t2 = _timed(e, ids, s.n2)
            t1 = _timed(e, ids, s.n1)
        return {"n1": t1, "n2": t2, "prefill": _timed(e, self.prefill_prompt, 1)}

    def counters(self) -> dict | None:
        return self.engine.counters() if self.engine else None

    def close(self) -> dict:
        if self.engine:
            self.engine.close()
            self.engine = None
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class EngineWorker:
    """The parent's end of a worker process holding one EngineHost. `python` picks the interpreter
    (e.g. a venv where only that engine is installed; this one by default). Engines do not share
    thread pools, allocators or memory, and peak RSS is the engine's own. A reply that reports an
    error, or a worker that dies, raises BenchError."""

    def __init__(self, spec: str, files: dict, s: Settings, python: str | None = None):
        self.spec, self.files, self.s = spec, files, s
        self.python = python or sys.executable
        self.proc: subprocess.Popen | None = None

    def open(self) -> dict:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        self.stderr = tempfile.TemporaryFile(mode="w+")   # a file: a chatty engine cannot fill a pipe
        try:
            first = "llama_cpp" if self.spec.split(":")[0] == "llama.cpp" else ""
            self.proc = subprocess.Popen([self.python, "-c", WORKER, first], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        except OSError as e:
            self.stderr.close()
            return {"engine": self.spec, "status": "error",
                    "reason": f"cannot start the worker with {self.python}: {e}"}
        try:
            return self._ask("open", spec=self.spec, files=self.files, settings=asdict(self.s))
        except BenchError as e:
            return {"engine": self.spec, "status": "error", "reason": str(e)}

    def run(self, index: int) -> dict:
        return self._ask("run", index=index)

    def counters(self) -> dict | None:
        return self._ask("counters")

    def close(self) -> dict:
        """Ask the worker to unload and exit; kill it if it does not. Returns its peak RSS (or {})."""
        if self.proc is None:
            return {}
        out = {}
        try:
            if self.proc.poll() is None:
                out = self._ask("close")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (BenchError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()
            self.stderr.close()
        return out

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _ask(self, op: str, **args):
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait()
            raise BenchError(f"the worker of {self.spec} exited with code {self.proc.returncode}"
                             f"{self._stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise BenchError(reply["error"])
        return reply["ok"]

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        err = self.stderr.read().strip()
        return f": {err[-3000:]}" if err else ""


# A llama.cpp worker imports llama_cpp (when installed) before anything of lattice: llama.cpp's
# CUDA build crashes loading a model in a process that imported lattice's runtime or torch first.
WORKER = """
import importlib, sys
if sys.argv[1]:
    try:
        importlib.import_module(sys.argv[1])
    except ImportError:
        pass
from lattice.bench.runner import serve
serve()
"""


def serve():
    """The worker's loop (python -m lattice.bench.runner): one request a line on stdin, one reply a
    line on the original stdout. File descriptor 1 is pointed at stderr first, so whatever an engine
    prints cannot corrupt the replies."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    host = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "open":
                host = EngineHost(req["spec"], req["files"], Settings(**req["settings"]))
                out = host.open()
            elif req["op"] == "run":
                out = host.run(req["index"])
            elif req["op"] == "counters":
                out = host.counters()
            elif req["op"] == "close":
                out = host.close() if host else {}
            else:
                raise BenchError(f"unknown request {req['op']!r}")
            reply = {"ok": out}
        except Exception as e:   # reported, not raised: the other engines still run
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
        if req["op"] == "close":
            break


# -------------------------------------------------------------------------------------- the schedule

def summarize_phase(raw: dict, s: Settings) -> dict:
    """A run whose T(N2) is not above its T(N1) (the engine stalled in its short generation: a
    preempted spinning thread can take seconds) has no slope: it is discarded and listed; the
    engine fails when that leaves fewer than half of its runs (at least 2)."""
    t1, t2 = raw["times_n1"], raw["times_n2"]
    bad = [i for i, (a, b) in enumerate(zip(t1, t2)) if not b > a]
    kept = [i for i in range(len(t1)) if i not in bad]
    if bad and len(kept) < max(2, (len(t1) + 1) // 2):
        slope_rates(s.n1, s.n2, t1, t2)  # raises, naming the first such run
    rates = slope_rates(s.n1, s.n2, [t1[i] for i in kept], [t2[i] for i in kept])
    discarded = [{"run": i, "t_n1": t1[i], "t_n2": t2[i]} for i in bad]
    return {**raw, "decode_tps": rates, "discarded_runs": discarded, "prefill_tps": [s.pp / t for t in raw["times_prefill"]],
            "decode": summarize(rates).to_dict(),
            "prefill": summarize([s.pp / t for t in raw["times_prefill"]]).to_dict(),
            "ttft_ms": summarize([t * 1e3 for t in raw["times_prefill"]]).to_dict()}


COUNTED = ("tokens", "steps", "submissions", "backend_calls", "api_calls")


def counters_delta(stretches: list[tuple[dict | None, dict | None]]) -> dict | None:
    """The runtime counters of one phase: the sum of (after - before) over the stretches it ran in,
    with per-token ratios over it."""
    if not stretches or any(b is None or a is None for b, a in stretches):
        return None
    last = stretches[-1][1]
    d = {"backend": last.get("backend"), "dispatches_per_step": last.get("dispatches_per_step"),
         **{k: sum(a[k] - b[k] for b, a in stretches) for k in COUNTED}}
    for k in ("steps", "submissions", "backend_calls", "api_calls"):
        d[f"{k}_per_token"] = d[k] / d["tokens"] if d["tokens"] else 0.0
    return d


def _welch_df(parts: list[tuple[float, float | None]]) -> float | None:
    """Welch-Satterthwaite degrees of freedom of a sum of independent variances, each with its own
    degrees of freedom: (sum v)^2 / sum(v^2 / df) over the nonzero ones; None where all are zero."""
    terms = [v ** 2 / df for v, df in parts if v > 0]
    return math.fsum(v for v, _ in parts) ** 2 / math.fsum(terms) if terms else None


def _interval(estimate: float, se: float, df: float | None, confidence: float) -> tuple[float, float]:
    half = t_quantile(0.5 + confidence / 2.0, df) * se if se > 0 else 0.0
    return estimate - half, estimate + half


def loss_of_means(unloaded: list[float], loaded: list[float], confidence: float = 0.95) -> dict:
    """Throughput lost under load from the means of the two samples, in percent, with its standard
    error and a confidence interval for the ratio of means (delta method: the squared relative
    standard errors add; Student's t with the Welch-Satterthwaite degrees of freedom, None where
    both samples are constant)."""
    mu, ml = mean(unloaded), mean(loaded)
    vu, vl = (stdev(unloaded) / mu) ** 2 / len(unloaded), (stdev(loaded) / ml) ** 2 / len(loaded)
    ratio = ml / mu
    loss, se = (1.0 - ratio) * 100.0, ratio * math.sqrt(vu + vl) * 100.0
    df = _welch_df([(vu, len(unloaded) - 1), (vl, len(loaded) - 1)])
    lo, hi = _interval(loss, se, df, confidence)
    return {"loss_pct": loss, "ci_low": lo, "ci_high": hi, "se": se, "df": df}


def loss_difference(a: dict, b: dict, confidence: float = 0.95) -> dict:
    """Engine a's loss minus engine b's (their loss_of_means; independent samples), in percentage
    points, with a confidence interval (Welch-Satterthwaite degrees of freedom)."""
    va, vb = a["se"] ** 2, b["se"] ** 2
    d = a["loss_pct"] - b["loss_pct"]
    lo, hi = _interval(d, math.sqrt(va + vb), _welch_df([(va, a["df"]), (vb, b["df"])]), confidence)
    return {"points": d, "ci_low": lo, "ci_high": hi}


def time_lost_per_token(unloaded: list[float], loaded: list[float], confidence: float = 0.95) -> dict:
    """The time per token that the load added, in microseconds: the mean of 1 / rate over the loaded
    runs minus that over the unloaded runs, with a confidence interval (Welch). Unlike the loss, it
    does not grow with the engine's own speed: the load's kernels take about the same GPU time from
    any engine that waits on the GPU, and nothing from time spent on the host."""
    tu, tl = [1e6 / r for r in unloaded], [1e6 / r for r in loaded]
    vu, vl = stdev(tu) ** 2 / len(tu), stdev(tl) ** 2 / len(tl)
    d = mean(tl) - mean(tu)
    lo, hi = _interval(d, math.sqrt(vu + vl), _welch_df([(vu, len(tu) - 1), (vl, len(tl) - 1)]), confidence)
    return {"us": d, "ci_low": lo, "ci_high": hi}


def unloaded_drift(raw: dict, half: int, s: Settings) -> float | None:
    """How much slower the unloaded runs after the load were than those before it, in percent of the
    median decode rate before (runs without a slope left out; None without runs on either side)."""
    def rates(sl):
        return [(s.n2 - s.n1) / (b - a) for a, b in zip(raw["times_n1"][sl], raw["times_n2"][sl]) if b > a]
    before, after = rates(slice(None, half)), rates(slice(half, None))
    return degradation_pct(median(before), median(after)) if before and after else None


PHASES = ("unloaded", "loaded")


class _Schedule:
    """Engines taking turns run by run; an engine that fails is recorded as an error and leaves."""

    def __init__(self, hosts: list, records: list[dict]):
        self.hosts, self.records = hosts, records
        self.live = [i for i, r in enumerate(records) if r["status"] == "ok"]
        self.raw = {ph: {i: {"times_n1": [], "times_n2": [], "times_prefill": []} for i in self.live} for ph in PHASES}
        self.stretches = {ph: {i: [] for i in self.live} for ph in PHASES}   # counters before / after

    def rounds(self, runs: range, phase: str | None):
        """Runs `runs` of every live engine, round by round: run r starts at engine r mod k. Their
        times and the counters over the stretch go to `phase` (None: warm-ups, discarded)."""
        before = self.counters() if phase else {}
        for r in runs:
            order = self.live[r % len(self.live):] + self.live[:r % len(self.live)] if self.live else []
            for i in order:
                if len(self.live) > 1:
                    time.sleep(SWITCH_PAUSE_S)
                try:
                    t = self.hosts[i].run(r)
                except BenchError as e:
                    self.fail(i, e)
                    continue
                if phase:
                    raw = self.raw[phase][i]
                    raw["times_n1"].append(t["n1"])
                    raw["times_n2"].append(t["n2"])
                    raw["times_prefill"].append(t["prefill"])
        if phase:
            after = self.counters()
            for i in self.live:
                self.stretches[phase][i].append((before.get(i), after.get(i)))

    def counters(self) -> dict:
        out = {}
        for i in list(self.live):
            try:
                out[i] = self.hosts[i].counters()
            except BenchError as e:
                self.fail(i, e)
        return out

    def finish(self, phase: str, s: Settings, **extra):
        """The phase's statistics into each live engine's record; a slope that cannot be computed
        (T(N2) <= T(N1)) fails the engine."""
        for i in list(self.live):
            try:
                stats = summarize_phase(self.raw[phase][i], s)
            except BenchError as e:
                self.fail(i, e)
                continue
            self.records[i][phase] = {**stats, "counters": counters_delta(self.stretches[phase][i]), **extra}

    def fail(self, i: int, e: Exception):
        """The engine leaves the schedule; its record keeps what was measured before."""
        self.records[i].update(status="error", reason=str(e))
        self.live.remove(i)


def measure(hosts: list, s: Settings) -> list[dict]:
    """Measure the hosts interleaved (see measure_together()), or with s.one_at_a_time one after
    another, each through the whole protocol (its own load processes included) while no other engine
    is loaded: under CUDA MPS every engine holding a context is a client of the one server, and idle
    clients slow some engines (ten slowed llama.cpp by 6-13%), which would lower their baseline.
    Returns one record per host, in order."""
    if not s.one_at_a_time:
        return measure_together(hosts, s)
    return [rec for h in hosts for rec in measure_together([h], s)]


def measure_together(hosts: list, s: Settings) -> list[dict]:
    """Open every engine (each loads its model), warm up, then measure them interleaved. With
    s.load > 0 the unloaded runs bracket the loaded ones: the first half of them, then every run
    under load (the load processes start after that half and stop before the rest), then the other
    half, so that a steady drift of the machine or of an engine does not pass for the load's effect.
    (Not paused load processes: under CUDA MPS, ten idle clients slowed llama.cpp by 6-13%.)
    Returns one record per host, in order; hosts are closed at the end, also on errors and Ctrl-C."""
    s.validate()
    records: list[dict] = []
    try:
        for h in hosts:
            records.append(h.open())
        sched = _Schedule(hosts, records)
        sched.rounds(range(s.warmup), None)
        half = (s.runs + 1) // 2 if s.load else s.runs
        sched.rounds(range(half), "unloaded")
        load = None
        if s.load and sched.live:
            with LoadProcesses(s.load, s.load_device, s.load_duty, s.load_period_ms,
                               python=s.load_python or None) as lp:
                sched.rounds(range(s.runs), "loaded")
            load = lp.summary()
        sched.rounds(range(half, s.runs), "unloaded")
        sched.finish("unloaded", s)
        if load:
            sched.finish("loaded", s, load=load)
            for i in sched.live:
                rec = records[i]
                rec["degradation_pct"] = {
                    m: degradation_pct(rec["unloaded"][m]["median"], rec["loaded"][m]["median"])
                    for m in ("decode", "prefill")}
                rec["loss_of_means"] = {m: loss_of_means(rec["unloaded"][f"{m}_tps"], rec["loaded"][f"{m}_tps"])
                                        for m in ("decode", "prefill")}
                rec["time_lost_us"] = {"decode": time_lost_per_token(rec["unloaded"]["decode_tps"],
                                                                     rec["loaded"]["decode_tps"])}
                rec["unloaded_drift_pct"] = unloaded_drift(sched.raw["unloaded"][i], half, s)
    finally:
        for i, h in enumerate(hosts):
            closed = h.close()
            if i < len(records) and "peak_rss_mb" in closed:
                records[i]["peak_rss_mb"] = closed["peak_rss_mb"]
    return records


if __name__ == "__main__":
    serve()
