"""lattice-bench's Apple GPU load (--load-device metal): the busy-loop kernel (metal/load.metal) in
the MSL emulator, the bridge's load generator (objc/lattice_load.mm) against the fake Metal
(tests/metal_fake), which times command buffers with GPUStartTime / GPUEndTime, and the load
processes run by lattice.bench.load through it."""
import ctypes
import json
import os
import sys
import time
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import metal_fake
from msl_emu import Library
from msl_emu.library import MSLCompileWarning
from lattice.bench import cli
from lattice.bench.load import LoadProcesses, MetalLoad, calibrate_metal
from lattice.bench.stats import BenchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD_METAL = os.path.join(ROOT, "metal", "load.metal")
COMPLETED = 4                                   # MTLCommandBufferStatusCompleted


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(bridge library built against the fake, a metallib holding metal/load.metal)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MSLCompileWarning)
        lib = metal_fake.metallib([LOAD_METAL], str(tmp_path_factory.mktemp("metallib")))
    return metal_fake.build(), lib


def test_spin_kernel_matches_numpy():
    out = np.zeros(96, np.float32)
    Library(LOAD_METAL).dispatch("lt_load_spin", [np.array([37], np.uint32), out], (3, 1, 1), (32, 1, 1),
                                 order_seed=5)
    x = np.arange(96, dtype=np.float64)
    for _ in range(37):
        x = (x * np.float32(0.999999) + 1.0).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(out, x, rtol=1e-6)


def test_fake_gpu_times_stay_zero_until_completed(files):
    so = ctypes.CDLL(files[0])
    so.fake_probe_gpu_times.restype = ctypes.c_long
    times = (ctypes.c_double * 4)()
    assert so.fake_probe_gpu_times(times) == COMPLETED
    before_start, before_end, start, end = list(times)
    assert before_start == 0.0 and before_end == 0.0          # documented: 0.0 until the GPU finished
    assert 0.0 < start <= end <= time.monotonic()             # host seconds


def test_burst_runs_the_kernel_and_reads_gpu_time(files):
    load = MetalLoad(*files, threadgroups=2, threads=32)
    try:
        assert load.burst(100) > 0.0 and load.burst(1) > 0.0
    finally:
        load.close()


def test_missing_kernel_or_library_is_named(files, tmp_path):
    other = metal_fake.metallib([os.path.join(ROOT, "metal", "elementwise.metal")], str(tmp_path),
                                include_dirs=[os.path.join(ROOT, "metal")])
    with pytest.raises(BenchError, match="has no kernel function lt_load_spin"):
        MetalLoad(files[0], other)
    with pytest.raises(BenchError, match="cannot load .*nowhere.metallib"):
        MetalLoad(files[0], str(tmp_path / "nowhere.metallib"))
    with pytest.raises(BenchError, match="threadgroups and threads per threadgroup must be positive"):
        MetalLoad(*files, threadgroups=0)
    with pytest.raises(BenchError, match="not a bridge library"):
        MetalLoad("/nonexistent/liblattice_metal.dylib", files[1])


def test_calibration_sizes_a_dispatch_to_the_target():
    calls = []

    def burst(n):                                  # a dispatch: 0.1 ms fixed + 1 us per iteration
        calls.append(n)
        return 1e-4 + n * 1e-6
    k, alone = calibrate_metal(burst, 0.002)
    # doubling from 256 reaches 2048 (2.148 ms >= 2 ms), scaled down linearly: 2048 * 2 / 2.148
    assert calls[:2] == [256, 256] and max(calls) == 2048
    assert k == 1907 and alone == pytest.approx(1e-4 + 1907e-6, rel=1e-12)


def test_metal_load_processes_submit_work_and_report_a_share(files, monkeypatch):
    monkeypatch.setenv("LATTICE_METAL_BRIDGE", files[0])
    monkeypatch.setenv("LATTICE_METAL_LIBRARY", files[1])
    with LoadProcesses(2, "metal", duty=0.2, period_ms=20) as lp:
        time.sleep(0.5)
    summ = lp.summary()
    assert summ["reported"] == 2 and summ["device"] == "metal"
    for r in summ["reports"]:
        assert r["device"] == "metal" and r["bursts"] > 0 and r["iterations_per_burst"] >= 1
        assert r["burst_alone_s"] > 0 and r["busy_events_s"] > 0
        assert 0 < r["share"] and 0 < r["share_events"] <= 1.0
    assert summ["share_pct"] > 0 and summ["share_events_pct"] > 0


def test_metal_load_off_apple_silicon_fails_clearly(monkeypatch):
    monkeypatch.delenv("LATTICE_METAL_BRIDGE", raising=False)
    monkeypatch.delenv("LATTICE_METAL_LIBRARY", raising=False)
    if sys.platform == "darwin":
        pytest.skip("this is a Mac: the Metal load may start here")
    with pytest.raises(BenchError, match="failed to start.*Metal load needs macOS on Apple silicon"):
        with LoadProcesses(1, "metal"):
            pass


def test_load_device_auto_is_metal_on_apple_silicon(monkeypatch):
    monkeypatch.setattr(cli.sys, "platform", "darwin")
    monkeypatch.setattr(cli.platform, "machine", lambda: "arm64")
    assert cli._default_load_device() == "metal"
    res = CliRunner().invoke(cli.main, ["run", "--help"])
    assert "auto: metal on Apple silicon" in " ".join(res.output.split())


def test_load_generator_uses_only_declared_metal_api(tmp_path):
    """Every Metal message objc/lattice_load.mm sends is declared in the test-only header, each
    declaration checked against Apple's documentation (GCC warns about undeclared ones)."""
    metal_fake.compile_bridge([os.path.join(ROOT, "objc", "lattice_load.mm")], str(tmp_path / "l.so"),
                              extra=["-Werror", "-fsyntax-only"])


def test_cli_contention_with_metal_load(files, monkeypatch, tmp_path):
    from lattice.bench import engines
    from test_bench import FakeEngine
    monkeypatch.setitem(engines.ENGINES, "fake", FakeEngine)
    monkeypatch.setenv("LATTICE_METAL_BRIDGE", files[0])
    monkeypatch.setenv("LATTICE_METAL_LIBRARY", files[1])
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli.main, ["run", "--gguf", str(model), "-e", "fake", "--runs", "2", "--warmup", "0",
                                        "--load", "1", "--load-device", "metal", "--load-duty", "0.2",
                                        "--load-period-ms", "20", "--in-process", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "1 x metal processes" in res.output and "by GPU timestamps" in res.output
    load = json.loads(out.read_text())["results"][0]["loaded"]["load"]
    assert load["device"] == "metal" and load["reported"] == 1 and load["reports"][0]["iterations_per_burst"] >= 1
