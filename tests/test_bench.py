"""lattice-bench: statistics on known inputs, the measurement protocol with a synthetic engine whose
times are exact, option parsing, skips, load processes, and the random-checkpoint writers."""
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from lattice.bench import cli, engines, make_model as mm, stats
from lattice.bench.engines import Engine, Timing
from lattice.bench.load import LoadProcesses
from lattice.bench.runner import EngineHost, EngineWorker, Settings, measure, prompt_ids
from lattice.bench.stats import BenchError
from lattice.errors import ConfigError, LatticeError

# ---------------------------------------------------------------------------------------------
# statistics

# two-sided 95% Student t critical values (standard tables, 9+ significant digits)
T975 = {1: 12.7062047362, 2: 4.30265272975, 4: 2.7764451052, 5: 2.57058183564, 10: 2.22813885199,
        14: 2.14478668792, 30: 2.04227245630, 120: 1.97993040505}


@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantile_matches_tables(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9)
    assert stats.t_quantile(0.025, df) == pytest.approx(-expected, rel=1e-9)


def test_t_quantile_other_levels_and_cdf():
    assert stats.t_quantile(0.995, 4) == pytest.approx(4.60409487142, rel=1e-9)
    assert stats.t_quantile(0.95, 7) == pytest.approx(1.89457860506, rel=1e-9)
    assert stats.t_quantile(0.5, 3) == 0.0
    assert stats.t_cdf(0.0, 9) == pytest.approx(0.5, abs=1e-15)
    # t with 1 degree of freedom is Cauchy: CDF(1) = 3/4
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, rel=1e-13)


def test_betainc_closed_forms():
    for x in (0.01, 0.3, 0.5, 0.77, 0.99):
        assert stats.betainc(1.0, 1.0, x) == pytest.approx(x, rel=1e-13)
        assert stats.betainc(3.0, 1.0, x) == pytest.approx(x ** 3, rel=1e-12)
        assert stats.betainc(1.0, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12)
    assert stats.betainc(7.5, 7.5, 0.5) == pytest.approx(0.5, rel=1e-13)
    assert stats.betainc(2, 3, 0.0) == 0.0 and stats.betainc(2, 3, 1.0) == 1.0


def test_summary_of_known_sample():
    s = stats.summarize([10.0, 12.0, 14.0, 16.0, 18.0])
    assert (s.n, s.mean, s.median, s.trimmed_mean) == (5, 14.0, 14.0, 14.0)
    assert s.stdev == pytest.approx(math.sqrt(10), rel=1e-15)
    half = 2.7764451052 * math.sqrt(10) / math.sqrt(5)          # t(0.975, 4) * s / sqrt(n)
    assert s.ci_low == pytest.approx(14 - half, rel=1e-9) and s.ci_high == pytest.approx(14 + half, rel=1e-9)
    assert s.spread_pct == pytest.approx(8 / 14 * 100, rel=1e-15)


def test_trimmed_mean_and_median_even():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1000.0]
    assert stats.trimmed_mean(xs, 0.1) == 5.5                      # drops 1 and 1000
    assert stats.median(xs) == 5.5
    with pytest.raises(BenchError):
        stats.trimmed_mean(xs, 0.5)


def test_mean_is_exactly_rounded():
    # naive left-to-right summation gives 0 here; fsum gives the exact 2/4
    assert stats.mean([1e16, 1.0, -1e16, 1.0]) == 0.5


def test_slope_rates_known_and_errors():
    # 448 tokens in 4.48 s = 100 tok/s, whatever the common overhead
    assert stats.slope_rates(64, 512, [1.0, 2.0], [5.48, 6.48]) == pytest.approx([100.0, 100.0], rel=1e-12)
    with pytest.raises(BenchError, match="n1=512"):
        stats.slope_rates(512, 64, [1.0], [2.0])
    with pytest.raises(BenchError, match="not greater"):
        stats.slope_rates(64, 512, [2.0], [2.0])
    with pytest.raises(BenchError, match="paired"):
        stats.slope_rates(64, 512, [1.0, 2.0], [3.0])
    with pytest.raises(BenchError):
        stats.summarize([])
    with pytest.raises(BenchError):
        stats.summarize([1.0, float("nan")])


def test_degradation():
    assert stats.degradation_pct(100.0, 79.0) == pytest.approx(21.0, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# a synthetic engine with exact times

CALLS = []          # (spec, prompt length, n) of every generate() call of every FakeEngine, in order


class FakeEngine(Engine):
    """T(prompt P, n tokens) = overhead + P * prefill + n * decode * (1 + jitter of the call)."""
    kind = "fake"
    formats = ("gguf", "hf")
    DECODE_S, PREFILL_S, OVERHEAD_S = 0.01, 0.001, 0.05
    instances = []

    def __init__(self, spec, options):
        super().__init__(spec, options)
        self.calls, self.jitter, self.short_by, self.short_at = [], [0.0], 0, None
        FakeEngine.instances.append(self)

    def load(self, model_path, threads, context):
        self.loaded = (model_path, threads, context)

    def vocab_size(self):
        return 1000

    def generate(self, prompt_ids, n):
        j = self.jitter[len(self.calls) % len(self.jitter)]
        short = self.short_by if self.short_at is None or len(self.calls) >= self.short_at else 0
        self.calls.append((len(prompt_ids), n))
        CALLS.append((self.spec, len(prompt_ids), n))
        return Timing(self.OVERHEAD_S + len(prompt_ids) * self.PREFILL_S + n * self.DECODE_S * (1 + j),
                      n - short)

    def info(self):
        return {"backend": "fake", "quant": "none"}

    def counters(self):
        """Like the runtime's: 2 steps and 1 submission per token (prefill counted as one token)."""
        tokens = sum(c[1] for c in self.calls)
        return {"backend": "fake", "tokens": tokens, "steps": 2 * tokens, "dispatches_per_step": 7,
                "submissions": tokens, "backend_calls": tokens, "api_calls": 10 * tokens}


@pytest.fixture(autouse=True)
def _fresh_fakes():
    FakeEngine.instances.clear()
    CALLS.clear()


def measure_fakes(s, *specs, registry=None):
    """measure() over in-process hosts of fake engines; returns the records and the engines."""
    reg = {"fake": FakeEngine, **(registry or {})}
    recs = measure([EngineHost(spec, {"gguf": "model.gguf"}, s, reg) for spec in specs], s)
    return recs, list(FakeEngine.instances)


def test_protocol_end_to_end_with_exact_times():
    s = Settings(n1=64, n2=512, warmup=2, runs=15, pp=512, prompt_tokens=16, threads=3)
    (rec,), (eng,) = measure_fakes(s, "fake")
    assert eng.loaded == ("model.gguf", 3, s.context)
    # every run: one N1, one N2, one prefill (max_tokens=1); warm-ups included
    assert len(eng.calls) == 3 * (2 + 15)
    assert sorted(set(eng.calls)) == [(16, 64), (16, 512), (512, 1)]
    d = rec["unloaded"]["decode"]
    assert d["n"] == 15
    assert d["median"] == pytest.approx(100.0, rel=1e-12)       # 1 / DECODE_S
    assert d["stdev"] == pytest.approx(0.0, abs=1e-9)
    p = rec["unloaded"]["prefill"]
    assert p["median"] == pytest.approx(512 / (0.05 + 0.512 + 0.01), rel=1e-12)
    assert rec["unloaded"]["ttft_ms"]["median"] == pytest.approx(572.0, rel=1e-12)
    assert "loaded" not in rec and rec["info"]["backend"] == "fake" and rec["peak_rss_mb"] > 0


def test_protocol_slope_follows_jitter():
    # calls per run: N1, N2, prefill (even runs); N2, N1, prefill (odd runs). Jitter only on run 0's N2.
    s = Settings(n1=64, n2=512, warmup=2, runs=2, pp=512, prompt_tokens=16)

    class Jittery(FakeEngine):
        def __init__(self, spec, options):
            super().__init__(spec, options)
            self.jitter = [0.0] * 6 + [0.0, 0.25, 0.0] + [0.0] * 3
    (rec,), _ = measure_fakes(s, "jittery", registry={"jittery": Jittery})
    slope0 = 448 / (0.05 + 0.016 + 5.12 * 1.25 - (0.05 + 0.016 + 0.64))
    assert rec["unloaded"]["decode_tps"] == pytest.approx([slope0, 100.0], rel=1e-12)


def test_runs_interleave_between_engines():
    """Warm-ups first, then run r of every engine before run r + 1 of any; the engine that goes first
    rotates; within a run N1/N2 order alternates."""
    measure_fakes(Settings(n1=2, n2=5, warmup=2, runs=3, pp=7, prompt_tokens=3), "fake:a", "fake:b")
    even, odd = [(3, 2), (3, 5), (7, 1)], [(3, 5), (3, 2), (7, 1)]
    expect = []
    for r, first in ((0, "a"), (1, "b"), (0, "a"), (1, "b"), (2, "a")):      # 2 warm-ups, 3 measured runs
        for spec in (["fake:a", "fake:b"] if first == "a" else ["fake:b", "fake:a"]):
            expect += [(spec, p, n) for p, n in (even if r % 2 == 0 else odd)]
    assert CALLS == expect


def test_failing_engine_is_reported_and_the_others_go_on():
    class Short(FakeEngine):
        def __init__(self, spec, options):
            super().__init__(spec, options)
            self.short_by, self.short_at = 1, 6           # fine in the warm-up, short in measured run 0
    recs, _ = measure_fakes(Settings(runs=3, warmup=2), "fake", "short", "fake:x", registry={"short": Short})
    assert (recs[1]["status"], recs[1]["reason"]) == (
        "error", "short produced 63 tokens when asked for 64; the slope would be wrong")
    assert "unloaded" not in recs[1] and recs[1]["info"]["backend"] == "fake"   # what it had: the header
    assert [r["status"] for r in recs] == ["ok", "error", "ok"]
    assert recs[0]["unloaded"]["decode"]["n"] == 3 and recs[2]["unloaded"]["decode"]["n"] == 3


class FakeLoad:
    """Stands in for LoadProcesses: records whether the load runs, and len(CALLS) at each start."""
    running, events, started_at = False, [], []

    def __init__(self, n, device, duty, period_ms, python=None):
        FakeLoad.events = ["start"]

    def __enter__(self):
        FakeLoad.running = True
        FakeLoad.started_at.append(len(CALLS))
        return self

    def __exit__(self, *exc):
        FakeLoad.running = False
        FakeLoad.events.append("stop")

    def summary(self):
        return {"processes": 1, "share_pct": 2.0}


@pytest.fixture
def fake_load(monkeypatch):
    from lattice.bench import runner
    monkeypatch.setattr(runner, "LoadProcesses", FakeLoad)
    FakeLoad.started_at = []
    return FakeLoad


class Slowed(FakeEngine):
    """Every call takes 1.25x as long while the (fake) load runs; records the load's state per call."""
    def generate(self, prompt_ids, n):
        t = super().generate(prompt_ids, n)
        self.calls[-1] += (FakeLoad.running,)
        return Timing(t.seconds * (1.25 if FakeLoad.running else 1.0), t.tokens)


def test_unloaded_runs_bracket_the_loaded_ones(fake_load):
    """Warm-ups and the first half of the unloaded runs before the load starts, every loaded run,
    then the other unloaded half once it has stopped; run indices (the N1/N2 order) as without load."""
    s = Settings(n1=4, n2=8, warmup=1, runs=5, pp=5, prompt_tokens=3, load=1)
    (rec,), (eng,) = measure_fakes(s, "slowed", registry={"slowed": Slowed})
    assert [c[2] for c in eng.calls[::3]] == [False] + [False] * 3 + [True] * 5 + [False] * 2
    n = [c[1] for c in eng.calls]
    assert n[3:6] == n[12:15] == [4, 8, 1] and n[15:18] == n[27:30] == [8, 4, 1]   # runs 0 and 1, 3
    assert fake_load.events == ["start", "stop"]
    assert rec["loaded"]["load"] == {"processes": 1, "share_pct": 2.0}
    assert rec["unloaded"]["decode"]["n"] == rec["loaded"]["decode"]["n"] == 5
    assert rec["unloaded_drift_pct"] == pytest.approx(0.0, abs=1e-9)


class Resident(Slowed):
    """Logs into CALLS when it loads and closes, so a test sees which engines were loaded at once."""
    def load(self, model_path, threads, context):
        super().load(model_path, threads, context)
        CALLS.append((self.spec, "load"))

    def close(self):
        CALLS.append((self.spec, "close"))


def test_one_at_a_time_measures_each_engine_alone(fake_load):
    """--one-at-a-time: each engine loads, warms up, runs unloaded / loaded / unloaded under its own
    load processes and closes before the next one loads; the records keep the hosts' order."""
    s = Settings(n1=4, n2=8, warmup=1, runs=3, pp=5, prompt_tokens=3, load=1, one_at_a_time=True)
    recs, engines = measure_fakes(s, "resident:a", "resident:b", registry={"resident": Resident})
    starts = fake_load.started_at
    events = [(c[0], c[1] if c[1] in ("load", "close") else "run") for c in CALLS]
    a_close, b_load = events.index(("resident:a", "close")), events.index(("resident:b", "load"))
    assert events[0] == ("resident:a", "load") and a_close < b_load and events[-1] == ("resident:b", "close")
    assert {e[0] for e in events[:a_close]} == {"resident:a"} and {e[0] for e in events[b_load:]} == {"resident:b"}
    assert len(starts) == 2 and starts[0] < a_close < b_load < starts[1]       # a load of its own each
    assert [r["engine"] for r in recs] == ["resident:a", "resident:b"]
    for rec, eng in zip(recs, engines):
        assert [c[2] for c in eng.calls[::3]] == [False] * 3 + [True] * 3 + [False]
        assert rec["loss_of_means"]["decode"]["loss_pct"] == pytest.approx(20.0, rel=1e-12)


def test_loss_of_means_is_exact(fake_load):
    s = Settings(n1=4, n2=8, warmup=0, runs=3, pp=5, prompt_tokens=3, load=1)
    (rec,), _ = measure_fakes(s, "slowed", registry={"slowed": Slowed})
    for m in ("decode", "prefill"):
        lm = rec["loss_of_means"][m]
        for k in ("loss_pct", "ci_low", "ci_high"):
            assert lm[k] == pytest.approx(20.0, rel=1e-12)
        assert rec["degradation_pct"][m] == pytest.approx(20.0, rel=1e-12)


def test_loss_of_means_interval():
    from lattice.bench.runner import loss_of_means
    u, lo = [100.0, 102.0, 98.0, 101.0, 99.0], [80.0, 83.0, 77.0, 81.0, 79.0]
    lm = loss_of_means(u, lo)
    assert lm["loss_pct"] == pytest.approx(20.0, rel=1e-12)
    # delta method: se = ratio * sqrt((su/mu)^2/nu + (sl/ml)^2/nl), Welch-Satterthwaite df
    vu, vl = (stats.stdev(u) / 100.0) ** 2 / 5, (stats.stdev(lo) / 80.0) ** 2 / 5
    df = (vu + vl) ** 2 / (vu ** 2 / 4 + vl ** 2 / 4)
    half = stats.t_quantile(0.975, df) * 0.8 * math.sqrt(vu + vl) * 100.0
    assert (lm["ci_low"], lm["ci_high"]) == pytest.approx((20.0 - half, 20.0 + half), rel=1e-12)
    assert 2.0 < half < 4.0
    assert lm["df"] == pytest.approx(df, rel=1e-12) and lm["se"] == pytest.approx(80.0 * math.sqrt(vu + vl), rel=1e-12)
    still = loss_of_means([100.0, 100.0], [90.0, 90.0])
    assert (still["loss_pct"], still["ci_low"], still["ci_high"], still["se"], still["df"]) == (
        pytest.approx(10.0), pytest.approx(10.0), pytest.approx(10.0), 0.0, None)


def test_time_lost_per_token_interval():
    from lattice.bench.runner import time_lost_per_token
    u, lo = [100.0, 125.0, 80.0], [50.0, 40.0, 62.5]          # 10, 8, 12.5 ms; 20, 25, 16 ms a token
    t = time_lost_per_token(u, lo)
    tu, tl = [1e4, 8e3, 12.5e3], [2e4, 2.5e4, 1.6e4]
    assert t["us"] == pytest.approx(stats.mean(tl) - stats.mean(tu), rel=1e-12)
    vu, vl = stats.stdev(tu) ** 2 / 3, stats.stdev(tl) ** 2 / 3
    df = (vu + vl) ** 2 / (vu ** 2 / 2 + vl ** 2 / 2)
    half = stats.t_quantile(0.975, df) * math.sqrt(vu + vl)
    assert (t["ci_low"], t["ci_high"]) == pytest.approx((t["us"] - half, t["us"] + half), rel=1e-12)
    still = time_lost_per_token([1000.0, 1000.0], [500.0, 500.0])
    assert (still["us"], still["ci_low"], still["ci_high"]) == pytest.approx((1000.0, 1000.0, 1000.0))


def test_loss_difference_interval():
    from lattice.bench.runner import loss_difference, loss_of_means
    a = loss_of_means([100.0, 102.0, 98.0, 101.0, 99.0], [80.0, 83.0, 77.0, 81.0, 79.0])
    b = loss_of_means([50.0, 55.0, 45.0, 52.0], [45.0, 47.0, 40.0, 48.0])
    d = loss_difference(a, b)
    se2 = a["se"] ** 2 + b["se"] ** 2
    df = se2 ** 2 / (a["se"] ** 4 / a["df"] + b["se"] ** 4 / b["df"])
    half = stats.t_quantile(0.975, df) * math.sqrt(se2)
    assert d["points"] == pytest.approx(a["loss_pct"] - b["loss_pct"], rel=1e-12)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((d["points"] - half, d["points"] + half), rel=1e-12)
    exact = loss_difference(loss_of_means([10.0, 10.0], [8.0, 8.0]), b)   # one side without error
    assert exact["ci_high"] - exact["ci_low"] == pytest.approx(2 * stats.t_quantile(0.975, b["df"]) * b["se"])


def test_bracketing_cancels_a_drift(fake_load):
    """An engine that gets 3% slower every run and does not mind the load: bracketed, its loss stays
    near zero (unloaded-then-loaded phases would give about 21%); the drift is reported."""
    class Drifting(FakeEngine):
        def generate(self, prompt_ids, n):
            t = super().generate(prompt_ids, n)
            return Timing(t.seconds * 1.03 ** (len(self.calls) // 3), t.tokens)
    s = Settings(n1=4, n2=8, warmup=0, runs=8, pp=5, prompt_tokens=3, load=1)
    (rec,), _ = measure_fakes(s, "drifting", registry={"drifting": Drifting})
    lm = rec["loss_of_means"]["decode"]
    assert abs(lm["loss_pct"]) < 2.0 and lm["ci_low"] < 0 < lm["ci_high"]
    assert rec["unloaded_drift_pct"] == pytest.approx((1 - 1.03 ** -12) * 100, rel=1e-9)


def test_engine_without_a_valid_slope_is_an_error(fake_load):
    class Backwards(FakeEngine):                     # N2 tokens faster than N1 while the load runs
        def generate(self, prompt_ids, n):
            t = super().generate(prompt_ids, n)
            return Timing(0.001 if n == 8 and FakeLoad.running else t.seconds, t.tokens)
    s = Settings(n1=4, n2=8, warmup=0, runs=2, pp=5, prompt_tokens=3, load=1)
    recs, _ = measure_fakes(s, "backwards", "fake", registry={"backwards": Backwards})
    assert recs[0]["status"] == "error" and "is not greater than T(N1=4)" in recs[0]["reason"]
    assert recs[0]["unloaded"]["decode"]["n"] == 2 and "loaded" not in recs[0]    # kept: the unloaded phase
    assert recs[1]["status"] == "ok" and recs[1]["loaded"]["decode"]["n"] == 2


def test_a_stalled_run_is_discarded_and_listed():
    class OneStall(FakeEngine):                      # one N1 generation stalls for a second
        def generate(self, prompt_ids, n):
            t = super().generate(prompt_ids, n)
            stalled = n == 4 and sum(1 for c in self.calls if c[1] == 4) == 2
            return Timing(t.seconds + 1.0 if stalled else t.seconds, t.tokens)
    s = Settings(n1=4, n2=8, warmup=0, runs=4, pp=5, prompt_tokens=3)
    (rec,), _ = measure_fakes(s, "stall", registry={"stall": OneStall})
    assert rec["status"] == "ok" and rec["unloaded"]["decode"]["n"] == 3
    (d,) = rec["unloaded"]["discarded_runs"]
    assert d["t_n1"] > d["t_n2"]


def test_runtime_counters_per_phase():
    s = Settings(n1=4, n2=8, warmup=1, runs=2, pp=5, prompt_tokens=3, load=1, load_device="cpu", load_duty=0.05)
    (rec,), _ = measure_fakes(s, "fake")
    for phase in ("unloaded", "loaded"):
        c = rec[phase]["counters"]
        assert c["tokens"] == 2 * (4 + 8 + 1)                   # the phase's runs only, not the warm-up
        assert (c["steps_per_token"], c["submissions_per_token"], c["api_calls_per_token"]) == (2.0, 1.0, 10.0)
        assert c["dispatches_per_step"] == 7 and c["backend"] == "fake"


def test_prompt_ids_fixed_and_in_range():
    ids = prompt_ids(384, 512)
    assert ids == prompt_ids(384, 512) and len(ids) == 512
    assert min(ids) >= 96 and max(ids) < 383


def test_settings_validation():
    for bad in (dict(n1=0), dict(n1=512, n2=64), dict(runs=1), dict(warmup=-1), dict(pp=0), dict(threads=0)):
        with pytest.raises(BenchError):
            Settings(**bad).validate()


# ---------------------------------------------------------------------------------------------
# command line

@pytest.fixture
def fake_registry(monkeypatch):
    monkeypatch.setitem(engines.ENGINES, "fake", FakeEngine)


def test_cli_run_tables_json_csv(tmp_path, fake_registry):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "-e", "fake", "-e", "nosuch-but-skipped",
                                        "--runs", "3", "--warmup", "0", "--threads", "2",
                                        "--json", str(out_json), "--csv", str(out_csv), "--in-process"])
    assert res.exit_code == 2 and "unknown engine 'nosuch-but-skipped'" in res.output
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "-e", "fake", "-e", "transformers",
                                        "--runs", "3", "--warmup", "0", "--threads", "2",
                                        "--json", str(out_json), "--csv", str(out_csv), "--in-process"])
    assert res.exit_code == 0, res.output
    assert "pp512" in res.output and "tg448" in res.output and "100.00 ± 0.00" in res.output
    assert "transformers: skipped: " in res.output
    counters_row = next(line for line in res.output.splitlines() if "fake" in line and "unloaded" in line
                        and line.count("|") == 9)
    assert [c.strip() for c in counters_row.split("|")[1:-1]] == ["fake", "unloaded", "fake", "7", "2.000", "1.000",
                                                                    "1.000", "10.0"]
    doc = json.loads(out_json.read_text())
    assert doc["settings"]["threads"] == 2 and "cpu" in doc["machine"] and "command" in doc["machine"]
    fake = doc["results"][0]
    assert fake["status"] == "ok" and fake["unloaded"]["decode"]["median"] == pytest.approx(100.0)
    rows = out_csv.read_text().splitlines()
    assert rows[0].startswith("engine,status,phase,metric") and len(rows) == 1 + 3 + 1


def _loss_table(output: str) -> list[dict]:
    """The rows of a report's loss table, as {header: cell} (the first of two equal headers is
    renamed "unloaded spread %")."""
    lines = output.splitlines()
    h = next(i for i, line in enumerate(lines) if "of means [95% CI]" in line)
    cells = lambda line: [c.strip() for c in line.split("|")[1:-1]]  # noqa: E731
    rows = []
    for line in lines[h + 2:]:
        if not line.startswith("|"):
            break
        header = cells(lines[h])
        header[header.index("spread %")] = "unloaded spread %"
        rows.append(dict(zip(header, cells(line))))
    return rows


def test_cli_loss_table_gives_the_loss_of_means(tmp_path, fake_registry, fake_load, monkeypatch):
    monkeypatch.setitem(engines.ENGINES, "slowed", Slowed)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "-e", "slowed", "--runs", "3", "--warmup", "0",
                                        "--load", "1", "--load-device", "cpu", "--in-process"])
    assert res.exit_code == 0, res.output
    (row,) = _loss_table(res.output)
    assert (row["engine"], row["decode loss %"], row["of means [95% CI]"], row["drift %"], row["load share %"]) == (
        "slowed", "20.00", "20.00 [20.00, 20.00]", "0.00", "2.00")
    assert row["us/token lost [95% CI]"] == "2500.0 [2500.0, 2500.0]"   # 10 ms a token, 1.25x as long
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "-e", "slowed", "-e", "fake", "--runs", "3",
                                        "--warmup", "0", "--load", "1", "--load-device", "cpu", "--in-process"])
    assert res.exit_code == 0, res.output
    assert ("decode loss, slowed minus fake: +20.00 points [+20.00, +20.00] (95% CI; an interval below 0: "
            "slowed lost less)") in res.output
    # the same difference one engine at a time: each went through its own load (two starts)
    started = len(fake_load.started_at)
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "-e", "slowed", "-e", "fake", "--runs", "3",
                                        "--warmup", "0", "--load", "1", "--load-device", "cpu", "--in-process",
                                        "--one-at-a-time"])
    assert res.exit_code == 0, res.output
    assert "(one at a time)" in res.output and len(fake_load.started_at) == started + 2
    assert "decode loss, slowed minus fake: +20.00 points [+20.00, +20.00]" in res.output


def test_cli_rejects_bad_options(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    r = CliRunner()
    res = r.invoke(cli.main, ["run", "--gguf", str(model), "--n1", "600", "--n2", "512"])
    assert res.exit_code == 2 and "n1=600" in res.output
    res = r.invoke(cli.main, ["run", "--gguf", str(model), "--load", "2", "--load-duty", "1.5"])
    assert res.exit_code == 2 and "--load-duty" in res.output
    res = r.invoke(cli.main, ["run"])
    assert res.exit_code == 2 and "--gguf FILE and/or --hf FOLDER" in res.output
    res = r.invoke(cli.main, ["run", "--gguf", str(tmp_path / "missing.gguf")])
    assert res.exit_code == 2


def test_cli_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 1 and "pip install 'lattice[bench]'" in res.output


def test_help_documents_the_method():
    res = CliRunner().invoke(cli.main, ["run", "--help"])
    assert res.exit_code == 0
    for phrase in ("(N2 - N1) / (T(N2) - T(N1))", "N1=64, N2=512", "15 measured runs", "Student's t",
                   "spread % = (max - min) / mean", "--load", "interleaved"):
        assert phrase in res.output


def test_skipped_when_not_installed_or_no_matching_file():
    class Missing(FakeEngine):
        package = "surely_not_an_installed_package_xyz"
    r = EngineHost("missing", {"gguf": "m.gguf"}, Settings(), {"missing": Missing}).open()
    assert r == {"engine": "missing", "status": "skipped",
                 "reason": "not installed (surely_not_an_installed_package_xyz is missing)"}

    class HFOnly(FakeEngine):
        formats = ("hf",)
    r = EngineHost("hfonly", {"gguf": "m.gguf", "hf": None}, Settings(), {"hfonly": HFOnly}).open()
    assert r["status"] == "skipped" and "needs a model in hf format" in r["reason"]


def test_engine_specs_parse():
    e = engines.make_engine("lattice:cpu:q8")
    assert isinstance(e, engines.LatticeEngine) and e.options == ["cpu", "q8"]
    assert isinstance(engines.make_engine("llama.cpp:gpu"), engines.LlamaCppEngine)
    with pytest.raises(BenchError, match="unknown engine 'vllm'"):
        engines.make_engine("vllm")


def test_worker_process_reports_errors():
    w = EngineWorker("nosuch", {"gguf": "m.gguf"}, Settings())
    try:
        r = w.open()
    finally:
        w.close()
    assert r["status"] == "error" and "unknown engine 'nosuch'" in r["reason"]
    assert w.proc.returncode is not None                        # the worker is gone


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny SmolLM2-shaped model as an HF folder and as GGUF (f32)."""
    out = tmp_path_factory.mktemp("tiny")
    spec = mm.model_spec("smollm2-135m", tiny=True)
    mm.write_hf(spec, str(out / "hf"), seed=1, dtype="f32")
    return {"hf": str(out / "hf"), "gguf": mm.write_gguf(spec, str(out / "m.gguf"), seed=1, outtype="f32", dtype="f32")}


def test_worker_processes_measure_a_tiny_model(tiny_model):
    """Two Lattice backends, each in its own worker process, loaded once and interleaved."""
    # N2 - N1 = 299 tokens (tens of ms) so that scheduling noise on a busy machine cannot make a slope negative
    s = Settings(n1=1, n2=300, warmup=0, runs=2, pp=8, prompt_tokens=4, threads=1)
    hosts = [EngineWorker("lattice:cpu", tiny_model, s), EngineWorker("lattice:reference", tiny_model, s)]
    recs = measure(hosts, s)
    assert [r["status"] for r in recs] == ["ok", "ok"], recs
    cpu, ref = recs
    assert cpu["model_file"] == tiny_model["gguf"] and cpu["info"]["backend"] == "cpu"
    assert ref["info"]["backend"] == "reference" and ref["unloaded"]["counters"] is None
    c = cpu["unloaded"]["counters"]
    assert c["backend"] == "cpu" and c["tokens"] == 2 * (1 + 300 + 1) and c["dispatches_per_step"] > 0
    assert c["submissions"] == 0 and c["backend_calls_per_token"] > 0
    for r in recs:
        assert len(r["unloaded"]["times_n2"]) == 2 and r["unloaded"]["decode"]["n"] == 2 and r["peak_rss_mb"] > 0
    assert hosts[0].proc.pid != hosts[1].proc.pid and all(h.proc.returncode == 0 for h in hosts)


def test_cli_measures_engines_in_workers(tiny_model, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli.main, ["run", "--gguf", tiny_model["gguf"], "-e", "lattice:cpu", "-e", "lattice:reference",
                                        "--n1", "1", "--n2", "300", "--runs", "2", "--warmup", "0", "--pp", "8",
                                        "--prompt-tokens", "4", "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [r["status"] for r in doc["results"]] == ["ok", "ok"]
    assert "dispatches/step" in res.output and "tg299" in res.output
    row = next(line for line in res.output.splitlines() if "lattice:cpu" in line and "unloaded" in line
               and line.count("|") == 9)
    assert row.split("|")[3].strip() == "cpu"                                 # the runtime's backend


def test_worker_that_dies_is_an_error(tiny_model):
    s = Settings(n1=2, n2=4, runs=2, pp=4, prompt_tokens=2)
    w = EngineWorker("lattice:cpu", tiny_model, s)
    try:
        assert w.open()["status"] == "ok"
        assert set(w.run(0)) == {"n1", "n2", "prefill"}
        w.proc.kill()
        with pytest.raises(BenchError, match="the worker of lattice:cpu exited with code -9"):
            w.run(1)
    finally:
        w.close()


def test_worker_reports_a_bad_backend(tiny_model):
    w = EngineWorker("lattice:nosuch", tiny_model, Settings())
    try:
        r = w.open()
    finally:
        w.close()
    assert r["status"] == "error" and "unknown backend 'nosuch'" in r["reason"]


# ---------------------------------------------------------------------------------------------
# load processes

def _alive(pids):
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_cpu_load_processes_report_and_exit():
    with LoadProcesses(2, "cpu", duty=0.2, period_ms=10) as lp:
        pids = [p.pid for p in lp.procs]
        time.sleep(0.3)
    summ = lp.summary()
    assert summ["reported"] == 2 and all(r["bursts"] > 0 for r in summ["reports"])
    assert 0 < summ["share_pct"] < 200
    for p in pids:                      # reaped by communicate(); nothing left running
        assert not _alive([p]) or open(f"/proc/{p}/stat").read().split()[2] == "Z"


def test_load_processes_run_another_command():
    """A diagnostic's own load program (tests/gpu/load_kinds.py) runs under the same protocol."""
    cmd = [sys.executable, "-m", "lattice.bench.load", "--device", "cpu", "--duty", "0.5", "--period-ms", "10",
           "--parent", str(os.getpid())]
    with LoadProcesses(1, "cpu", command=cmd) as lp:
        assert lp.procs[0].args == cmd
        time.sleep(0.2)
    (r,) = lp.summary()["reports"]
    assert r["device"] == "cpu" and r["bursts"] > 0


def test_load_processes_stopped_on_error():
    pids = []
    with pytest.raises(RuntimeError):
        with LoadProcesses(1, "cpu", duty=0.05) as lp:
            pids = [p.pid for p in lp.procs]
            raise RuntimeError("engine failed")
    assert pids and not _alive(pids) and lp.procs == []


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA GPU")
def test_gpu_load_without_cuda_fails_clearly():
    with pytest.raises(BenchError, match="failed to start.*(CUDA|torch)"):
        with LoadProcesses(1, "cuda", ready_timeout=120):
            pass


def test_load_option_errors():
    for args in ((-1, "cpu", 0.02, 10), (1, "cpu", 0.0, 10), (1, "cpu", 0.02, 0), (1, "tpu", 0.02, 10)):
        with pytest.raises(BenchError):
            LoadProcesses(*args)


def test_contention_mode_with_fake_engine():
    s = Settings(runs=2, warmup=0, load=1, load_device="cpu", load_duty=0.05)
    (rec, other), _ = measure_fakes(s, "fake", "fake:2")
    assert other["loaded"]["load"] == rec["loaded"]["load"]             # one load for all engines
    assert rec["loaded"]["decode"]["median"] == pytest.approx(100.0)
    assert rec["degradation_pct"]["decode"] == pytest.approx(0.0, abs=1e-9)
    assert rec["loss_of_means"]["decode"]["loss_pct"] == pytest.approx(0.0, abs=1e-9)
    assert rec["loaded"]["load"]["reported"] == 1


def _cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads a process's CPU time from /proc")
def test_load_processes_pause_and_resume():
    """Paused, a load process does no work; resumed, it works again; its share counts the time it
    ran only. Pause and resume are idempotent (no command is sent twice)."""
    t0 = time.perf_counter()
    with LoadProcesses(1, "cpu", duty=0.5, period_ms=10) as lp:
        (pid,) = [p.pid for p in lp.procs]
        lp.pause()
        lp.pause()
        c = _cpu_seconds(pid)
        time.sleep(0.4)
        assert _cpu_seconds(pid) - c < 0.05
        lp.resume()
        lp.resume()
        c = _cpu_seconds(pid)
        time.sleep(0.4)
        assert _cpu_seconds(pid) - c > 0.1
    total = time.perf_counter() - t0
    (rep,) = lp.summary()["reports"]
    assert rep["wall_s"] < total - 0.35 and 0.3 < rep["share"] < 0.8


def test_load_process_that_stops_answering_is_an_error():
    with pytest.raises(BenchError, match="did not answer 'pause'"):
        with LoadProcesses(1, "cpu", duty=0.05, ready_timeout=1.0) as lp:
            os.kill(lp.procs[0].pid, signal.SIGSTOP)
            try:
                lp.pause()
            finally:
                os.kill(lp.procs[0].pid, signal.SIGCONT)


# ---------------------------------------------------------------------------------------------
# random checkpoints

def test_model_specs_match_published_shapes():
    q = mm.model_spec("qwen3.5-0.8b")
    assert (q["num_hidden_layers"], q["hidden_size"], q["intermediate_size"], q["vocab_size"]) == (24, 1024, 3584, 248320)
    assert q["layer_types"] == (["linear_attention"] * 3 + ["full_attention"]) * 6
    assert (q["num_attention_heads"], q["num_key_value_heads"], q["head_dim"]) == (8, 2, 256)
    assert (q["linear_num_key_heads"], q["linear_num_value_heads"], q["linear_key_head_dim"]) == (16, 16, 128)
    n_params = sum(int(np.prod(t.shape)) for t in mm.hf_tensors(q))
    assert 0.7e9 < n_params < 0.8e9                       # tied embeddings: ~0.75B text parameters
    s = mm.model_spec("smollm2-135m")
    assert 134e6 < sum(int(np.prod(t.shape)) for t in mm.hf_tensors(s)) < 135e6
    with pytest.raises(ConfigError, match="unknown model shape"):
        mm.model_spec("gpt-5")
    with pytest.raises(ConfigError, match="unknown config field"):
        mm.model_spec("smollm2-135m", hidden=3)
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer, got 0"):
        mm.model_spec("qwen3.5-0.8b", num_hidden_layers=0)
    with pytest.raises(ConfigError, match="unknown dtype 'f8'"):
        mm.write_hf(mm.model_spec("smollm2-135m", tiny=True), "/nonexistent/out", dtype="f8")
    with pytest.raises(ConfigError, match="vocab_size must be at least 258"):
        mm.model_spec("smollm2-135m", tiny=True, vocab_size=100)


@pytest.mark.parametrize("name", sorted(mm.MODELS))
def test_make_model_cli_and_hf_round_trip(tmp_path, name):
    from lattice.formats import open_checkpoint
    out = tmp_path / name
    res = CliRunner().invoke(cli.main, ["make-model", name, "--random", str(out), "--tiny", "--dtype", "f32",
                                        "--seed", "3"])
    assert res.exit_code == 0, res.output
    spec = mm.model_spec(name, tiny=True)
    ck = open_checkpoint(out)
    assert ck.config.num_hidden_layers == spec["num_hidden_layers"]
    assert ck.config.vocab_size == spec["vocab_size"]
    for hf_name, values in mm.generate(spec, seed=3, dtype="f32"):
        canon = hf_name.replace("model.language_model.", "model.")
        np.testing.assert_array_equal(ck.tensors[canon].to_f32(), values, err_msg=hf_name)
        assert np.isfinite(values).all() and np.abs(values).max() < 20


def _gguf_tensors(path):
    import gguf
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type.name == "Q8_0" else np.array(t.data)
        out[t.name] = (t.tensor_type.name, np.asarray(data, np.float32).reshape(tuple(int(d) for d in t.shape[::-1])))
    return r, out


def test_make_model_cli_rejects_bad_sizes(tmp_path):
    res = CliRunner().invoke(cli.main, ["make-model", "qwen3.5-0.8b", "--random", str(tmp_path / "q"),
                                        "--layers", "-2"])
    assert res.exit_code == 1 and "num_hidden_layers must be a positive integer, got -2" in res.output
    assert not (tmp_path / "q").exists()


def test_make_model_layers_override_keeps_the_hybrid_pattern():
    spec = mm.model_spec("qwen3.5-0.8b", tiny=True, num_hidden_layers=6)
    assert spec["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 2


def test_qwen35_gguf_follows_llama_cpp_conventions(tmp_path):
    import gguf
    spec = mm.model_spec("qwen3.5-0.8b", tiny=True)
    path = mm.write_gguf(spec, str(tmp_path / "q.gguf"), seed=5, outtype="f32", dtype="f32")
    reader, t = _gguf_tensors(path)
    kv = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.ggml.")}
    assert kv["general.architecture"] == "qwen35"
    assert kv["qwen35.full_attention_interval"] == 4 and kv["qwen35.rope.dimension_count"] == 8
    assert kv["qwen35.ssm.group_count"] == 2 and kv["qwen35.ssm.time_step_rank"] == 4
    assert kv["qwen35.ssm.inner_size"] == 64 and kv["qwen35.ssm.state_size"] == 16
    assert kv["qwen35.attention.key_length"] == 32 and kv["qwen35.rope.freq_base"] == 1e7
    hf = dict(mm.generate(spec, seed=5, dtype="f32"))
    p = "model.language_model.layers."
    # names agree with the gguf package's own HF -> GGUF map
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, spec["num_hidden_layers"])
    for name in hf:
        gname, _ = mm.gguf_name_and_transform(spec, name)
        key = name.replace("model.language_model.", "model.").replace(".dt_bias", ".dt_proj.bias")
        if not key.endswith("A_log"):
            assert tmap.get_name(key, try_suffixes=(".weight", ".bias")) == gname, name
    np.testing.assert_allclose(t["blk.0.attn_norm.weight"][1], 1 + hf[p + "0.input_layernorm.weight"], rtol=1e-6)
    np.testing.assert_allclose(t["blk.3.attn_q_norm.weight"][1], 1 + hf[p + "3.self_attn.q_norm.weight"], rtol=1e-6)
    np.testing.assert_array_equal(t["blk.0.ssm_norm.weight"][1], hf[p + "0.linear_attn.norm.weight"])
    np.testing.assert_allclose(t["blk.0.ssm_a"][1], -np.exp(hf[p + "0.linear_attn.A_log"])[[0, 2, 1, 3]], rtol=1e-6)
    np.testing.assert_array_equal(t["blk.3.attn_q.weight"][1], hf[p + "3.self_attn.q_proj.weight"])
    # value heads: HF groups them by key head (k0v0 k0v1 k1v0 k1v1), ggml wants them tiled (k0v0 k1v0 k0v1 k1v1)
    z = hf[p + "0.linear_attn.in_proj_z.weight"].reshape(4, 16, -1)
    np.testing.assert_array_equal(t["blk.0.attn_gate.weight"][1].reshape(4, 16, -1), z[[0, 2, 1, 3]])
    conv = hf[p + "0.linear_attn.conv1d.weight"][:, 0, :]
    got = t["blk.0.ssm_conv1d.weight"]
    assert got[0] == "F32" and got[1].shape == conv.shape
    np.testing.assert_array_equal(got[1][:64], conv[:64])                     # q and k channels unchanged
    np.testing.assert_array_equal(got[1][64:].reshape(4, 16, -1), conv[64:].reshape(4, 16, -1)[[0, 2, 1, 3]])
    out_proj = hf[p + "0.linear_attn.out_proj.weight"].reshape(64, 4, 16)
    np.testing.assert_array_equal(t["blk.0.ssm_out.weight"][1].reshape(64, 4, 16), out_proj[:, [0, 2, 1, 3]])
    assert "output.weight" not in t                                           # tied embeddings


def test_llama_gguf_permutes_q_k_and_writes_rope_factors(tmp_path):
    spec = mm.model_spec("llama-3.2-1b", tiny=True)
    path = mm.write_gguf(spec, str(tmp_path / "l.gguf"), seed=2, outtype="q8_0", dtype="f32")
    _, t = _gguf_tensors(path)
    hf = dict(mm.generate(spec, seed=2, dtype="f32"))
    q = hf["model.layers.1.self_attn.q_proj.weight"]                          # 4 heads x 64 rows
    # HF row order per head: [x0..x31 | y0..y31] (rotate-half); llama.cpp: x0 y0 x1 y1 ...
    expect = q.reshape(4, 2, 32, -1).transpose(0, 2, 1, 3).reshape(q.shape)
    assert t["blk.1.attn_q.weight"][0] == "Q8_0"
    np.testing.assert_allclose(t["blk.1.attn_q.weight"][1], expect, atol=np.abs(q).max() / 127)
    assert t["blk.0.attn_norm.weight"][0] == "F32"
    np.testing.assert_array_equal(t["blk.0.attn_norm.weight"][1], hf["model.layers.0.input_layernorm.weight"])
    f = t["rope_freqs.weight"][1]
    assert f.shape == (32,) and f[0] == 1.0 and f[-1] == 32.0 and np.all(np.diff(f) >= 0)


def test_llama3_rope_scaling_round_trip(tmp_path):
    """`make-model llama-3.2-1b`: config.json carries Llama 3.2's rope_scaling, the GGUF its
    rope_freqs.weight, and Lattice derives the same inverse frequencies from either. The tiny shape
    has the 1B's head_dim, rope_theta and rope_scaling (only the rope inputs matter here)."""
    from lattice.formats import open_checkpoint
    from lattice.formats.hf_config import config_from_hf
    from lattice.models import rope_inv_freq
    full = mm.model_spec("llama-3.2-1b")
    cfg = mm.hf_config(full)
    assert cfg["rope_theta"] == 500000.0 and cfg["head_dim"] == 64 and cfg["max_position_embeddings"] == 131072
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    spec = mm.model_spec("llama-3.2-1b", tiny=True)
    assert all(spec[k] == full[k] for k in ("head_dim", "rope_theta", "rope_scaling"))
    mm.write_hf(spec, str(tmp_path / "hf"), seed=1, dtype="f32")
    path = mm.write_gguf(spec, str(tmp_path / "l.gguf"), seed=1, outtype="q8_0", dtype="f32")
    from_hf = open_checkpoint(tmp_path / "hf").config
    from_gguf = open_checkpoint(path).config
    assert from_gguf.rope_scaling == from_hf.rope_scaling == cfg["rope_scaling"]
    inv_hf, inv_gguf = rope_inv_freq(from_hf), rope_inv_freq(from_gguf)
    np.testing.assert_array_equal(inv_hf, inv_gguf)
    np.testing.assert_array_equal(rope_inv_freq(config_from_hf(cfg)), inv_hf)       # the full 1B's config
    # what llama.cpp computes from the GGUF: theta^(-2i/d) / rope_freqs[i]
    _, t = _gguf_tensors(path)
    base = 500000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv_gguf, base / t["rope_freqs.weight"][1], rtol=1e-6)
    # wavelength 2 pi / f: below 8192 / 4 kept (15 frequencies), above 8192 divided by 32 (14), 3 between
    wavelen = 2 * np.pi / base
    kept, slowed = wavelen < 2048, wavelen > 8192
    assert (kept.sum(), slowed.sum()) == (15, 14)
    np.testing.assert_allclose(inv_hf[kept], base[kept], rtol=1e-6)
    np.testing.assert_allclose(inv_hf[slowed], base[slowed] / 32, rtol=1e-6)
    mid = ~kept & ~slowed
    assert np.all(inv_hf[mid] < base[mid]) and np.all(inv_hf[mid] > base[mid] / 32)


def test_gguf_f16_fallback_for_rows_not_multiple_of_32():
    from gguf import GGMLQuantizationType as Q
    assert mm.gguf_tensor_type("blk.0.ffn_down.weight", (64, 48), "q8_0") == Q.F16
    assert mm.gguf_tensor_type("blk.0.ffn_down.weight", (64, 64), "q8_0") == Q.Q8_0
    assert mm.gguf_tensor_type("blk.0.ssm_conv1d.weight", (64, 4), "q8_0") == Q.F32
    assert mm.gguf_tensor_type("blk.0.ssm_a", (4,), "f16") == Q.F32
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        mm.write_gguf(mm.model_spec("smollm2-135m", tiny=True), "/nonexistent/x.gguf", outtype="q4_k")


def test_gguf_round_trip_through_lattice_reader(tmp_path):
    """Writer and lattice.formats' GGUF reader agree: the reader undoes every llama.cpp convention."""
    pytest.importorskip("lattice.formats.gguf", reason="lattice.formats.gguf (formats engineer) not landed yet")
    from lattice.formats import open_checkpoint
    for name in sorted(mm.MODELS):
        spec = mm.model_spec(name, tiny=True)
        for outtype, atol in (("f32", 1e-6), ("q8_0", 2e-3)):
            path = mm.write_gguf(spec, str(tmp_path / f"{name}-{outtype}.gguf"), seed=4, outtype=outtype,
                                 dtype="f32")
            ck = open_checkpoint(path)
            assert ck.config.num_hidden_layers == spec["num_hidden_layers"]
            for hf_name, values in mm.generate(spec, seed=4, dtype="f32"):
                canon = hf_name.replace("model.language_model.", "model.")
                got = ck.tensors[canon].to_f32().reshape(values.shape)
                np.testing.assert_allclose(got, values, atol=atol, rtol=1e-5, err_msg=f"{name} {outtype} {canon}")


def test_cli_plot_writes_png(tmp_path, fake_registry):
    pytest.importorskip("matplotlib", reason="--plot is the optional 'bench' extra")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    png = tmp_path / "p.png"
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "-e", "fake", "--runs", "2", "--warmup", "0",
                                        "--plot", str(png), "--in-process"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_python_option_needs_kind_and_path(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "--python", "llama.cpp"])
    assert res.exit_code == 2 and "KIND=PYTHON" in res.output


def test_worker_uses_the_given_interpreter():
    r = EngineWorker("nosuch", {"gguf": "m.gguf"}, Settings(), python="/nonexistent/python").open()
    assert r["status"] == "error" and "cannot start the worker with /nonexistent/python" in r["reason"]


def test_cli_contention_table(tmp_path, fake_registry):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "-e", "fake", "--runs", "2", "--warmup", "0",
                                        "--load", "1", "--load-device", "cpu", "--load-duty", "0.05",
                                        "--in-process"])
    assert res.exit_code == 0, res.output
    assert "tg448 +load1" in res.output and "decode loss %" in res.output and "load share %" in res.output
    (row,) = _loss_table(res.output)
    cells = list(row.values())
    assert cells[:9] == ["fake", "100.00", "0.00", "100.00", "0.00", "0.00", "0.00 [0.00, 0.00]", "0.0 [0.0, 0.0]",
                         "0.00"]
    assert float(row["load share %"]) > 0                                                # the load's measured share


def test_lattice_eager_option_scopes_the_switch(monkeypatch):
    """lattice:cuda:eager sets LATTICE_CUDA_EAGER while its handles are created (load and session),
    then restores what was there, so that another Lattice engine in the process keeps graph replay."""
    import lattice
    seen = []

    class FakeModel:
        backend = "cuda"

        def session(self):
            seen.append(("session", os.environ.get("LATTICE_CUDA_EAGER")))

    def fake_load(path, backend, quant, context, threads):
        seen.append(("load", os.environ.get("LATTICE_CUDA_EAGER")))
        return FakeModel()

    monkeypatch.setattr(lattice, "load", fake_load)
    monkeypatch.setenv("LATTICE_CUDA_EAGER", "0")
    e = engines.make_engine("lattice:cuda:q8:eager")
    e.load("m.gguf", 1, 64)
    assert seen == [("load", "1"), ("session", "1")]
    assert os.environ["LATTICE_CUDA_EAGER"] == "0"
    assert (e.backend, e.quant, e.info()["launches"]) == ("cuda", "q8", "eager")
    monkeypatch.delenv("LATTICE_CUDA_EAGER")
    seen.clear()
    plain = engines.make_engine("lattice:cuda")
    plain.load("m.gguf", 1, 64)
    assert seen == [("load", None), ("session", None)] and "LATTICE_CUDA_EAGER" not in os.environ
    assert plain.info()["launches"] == "graph"
    with pytest.raises(BenchError, match="lattice:cpu:eager: the eager option is the CUDA backend's"):
        engines.make_engine("lattice:cpu:eager").load("m.gguf", 1, 64)


def _fake_torch_and_transformers(monkeypatch, calls):
    """Just enough of torch and transformers for TransformersEngine on a machine without them: a
    model whose generate() records the cache it got, and compiles (sets _compiled_call) when that
    cache is static, as transformers does on CUDA."""
    import types
    torch = types.ModuleType("torch")
    torch.bfloat16, torch.float16, torch.float32 = "bf16", "f16", "f32"
    torch.cuda = types.SimpleNamespace(is_available=lambda: True, synchronize=lambda: None)
    torch.set_num_threads = lambda n: None
    torch.no_grad = contextlib.nullcontext

    class Ids(list):
        @property
        def shape(self):
            return (1, len(self[0]))

    torch.tensor = lambda rows, device: Ids(rows)
    tf = types.ModuleType("transformers")

    class StaticCache:
        def __init__(self, config, max_cache_len):
            self.max_cache_len, self.resets = max_cache_len, 0

        def reset(self):
            self.resets += 1

    class Model:
        config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(vocab_size=99))
        generation_config = types.SimpleNamespace()

        def to(self, device):
            return self

        def eval(self):
            return self

        def generate(self, ids, max_new_tokens, do_sample, past_key_values=None):
            calls.append((past_key_values, past_key_values.resets if past_key_values else None))
            if isinstance(past_key_values, StaticCache):
                self._compiled_call = object()
            return Ids([ids[0] + [0] * max_new_tokens])

    tf.StaticCache = StaticCache
    tf.AutoModelForCausalLM = types.SimpleNamespace(from_pretrained=lambda path, dtype: Model())
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "transformers", tf)


def test_transformers_static_cache_option(monkeypatch):
    calls = []
    _fake_torch_and_transformers(monkeypatch, calls)
    e = engines.make_engine("transformers:bf16:cuda:static")
    e.load("hf-dir", 1, 336)
    assert e.cache.max_cache_len == 336
    assert len(calls) == 1 and calls[0] == (e.cache, 1)          # load compiled with a reset cache
    t = e.generate([5, 6, 7], 8)
    assert t.tokens == 8 and calls[1] == (e.cache, 2)           # the same cache, reset before the call
    assert (e.info()["cache"], e.info()["compiled"], e.dtype, e.device) == ("static", True, "bf16", "cuda")
    calls.clear()
    d = engines.make_engine("transformers")
    d.load("hf-dir", 1, 336)
    assert d.cache is None and calls == [] and d.generate([5], 3).tokens == 3 and calls == [(None, None)]
    assert (d.info()["cache"], d.info()["compiled"], d.device) == ("dynamic", False, "cuda")
    for spec in ("transformers:bf16:gpu", "transformers:bf16:cuda:static:x", "transformers:int4"):
        with pytest.raises(BenchError, match="transformers"):
            engines.make_engine(spec).load("hf-dir", 1, 336)
