"""Background load processes for contention mode (`lattice-bench run --load N`).

Each process submits a small piece of work every period (default 0.2 ms of work every 10 ms: a 2% duty
cycle), like other applications sharing the device, and measures how much device time its work took.

- cuda: square matmuls through torch on the default CUDA device. The work per period is calibrated
  alone at start-up; the report gives the load's share of GPU time both as that calibrated work
  (bursts x burst time alone) and as measured by CUDA events (which also counts time spent queued
  behind the engine, so it is an upper bound).
- metal (Apple GPUs): one compute dispatch of a busy-loop kernel (metal/load.metal) per period,
  submitted through the Metal bridge library (objc/lattice_load.mm) in its own command buffer and
  timed by the GPU (the command buffer's GPUEndTime - GPUStartTime). The loop count is calibrated
  alone at start-up so one dispatch takes duty x period of GPU time; the share is reported as for
  cuda: calibrated work, and as measured by the GPU timestamps during the run (an upper bound: the
  GPU may run other processes' work between the dispatch's start and end).
- cpu: a Python arithmetic loop (one core per process); its share is its CPU time over wall time.

Run as `python -m lattice.bench.load --device cuda --duty 0.02 --period-ms 10`: it prints "ready"
once calibrated, works until SIGTERM/SIGINT (or until its parent dies), then prints one JSON report.
While it works, a line "pause" on its stdin stops it after the burst in progress (it answers
"paused": none of its work is left on the device), and "run" starts it again at a random point of
the period (it answers "running"), so that paused processes do not resume in step. Shares count
the time spent running only. The harness does not pause the load for its unloaded runs: under CUDA
MPS, paused processes still slowed llama.cpp by 6-13% (tests/gpu/paused_load.py measures it).
"""
from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time

from .stats import BenchError


class _Stop:
    requested = False


def _on_signal(signum, frame):
    _Stop.requested = True


class _Commands:
    """The harness's "pause" / "run" lines on stdin, read from the file descriptor (a buffered
    reader could hold a second line that select() would then not report)."""

    def __init__(self):
        self.sel, self.buf = selectors.DefaultSelector(), b""
        try:
            self.fd = sys.stdin.fileno()
            self.sel.register(self.fd, selectors.EVENT_READ)
        except (ValueError, OSError, AttributeError):  # no stdin, or one that cannot be selected
            pass

    def wait(self, timeout: float) -> str | None:
        """The next command, or None once `timeout` seconds pass without one."""
        if b"\n" not in self.buf:
            if not self.sel.get_map():
                time.sleep(max(0.0, timeout))
                return None
            if not self.sel.select(max(0.0, timeout)):
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:                 # the harness closed the pipe: no more commands
                self.sel.unregister(self.fd)
                return None
            self.buf += chunk
            if b"\n" not in self.buf:
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip() or None


def duty_cycle(burst, period: float, parent: int) -> tuple[int, float, float]:
    """Call burst() once every period (it returns the device seconds it measured) until stopped,
    obeying pause / run. Returns (bursts, measured seconds, seconds spent running)."""
    commands = _Commands()
    bursts, measured, active = 0, 0.0, 0.0
    running, t_on = True, time.perf_counter()
    tick = t_on
    while not _Stop.requested and os.getppid() == parent:
        if running and time.perf_counter() >= tick:
            measured += burst()
            bursts += 1
            tick += period
        cmd = commands.wait(tick - time.perf_counter() if running else 0.1)  # <= 0: a poll
        if cmd == "pause" and running:
            running, active = False, active + time.perf_counter() - t_on
            print("paused", flush=True)
        elif cmd == "run" and not running:
            running, t_on = True, time.perf_counter()
            tick = t_on + random.uniform(0.0, period)
            print("running", flush=True)
    if running:
        active += time.perf_counter() - t_on
    return bursts, measured, active


def run_cpu(duty: float, period: float, parent: int) -> dict:
    print("ready", flush=True)
    x = 1.0

    def burst():
        nonlocal x
        end = time.perf_counter() + duty * period
        while time.perf_counter() < end:
            for _ in range(200):
                x = x * 1.0000001 + 1e-9
        return 0.0

    c0 = time.process_time()
    bursts, _, wall = duty_cycle(burst, period, parent)
    busy = time.process_time() - c0
    return {"device": "cpu", "bursts": bursts, "wall_s": wall, "busy_s": busy, "share": busy / wall if wall else 0.0}


def run_cuda(duty: float, period: float, parent: int, size: int = 512) -> dict:
    try:
        import torch
    except ImportError:
        raise BenchError("GPU load needs torch with CUDA; torch is not installed") from None
    if not torch.cuda.is_available():
        raise BenchError("GPU load needs torch with a CUDA device")
    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def burst(k):
        start.record()
        for _ in range(k):
            torch.mm(a, b)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    burst(20)                                               # warm up (cuBLAS handles, clocks)
    per_mm = min(burst(50) for _ in range(5)) / 50
    k = max(1, round(duty * period / per_mm))
    alone = min(burst(k) for _ in range(5))
    print("ready", flush=True)
    bursts, measured, wall = duty_cycle(lambda: burst(k), period, parent)
    return {"device": "cuda", "gpu": torch.cuda.get_device_name(), "matmul": size, "matmuls_per_burst": k,
            "burst_alone_s": alone, "bursts": bursts, "wall_s": wall, "busy_s": bursts * alone,
            "busy_events_s": measured, "share": bursts * alone / wall, "share_events": measured / wall}


# One Metal load dispatch: 16 threadgroups of 64 threads, a small compute pass like an app's.
METAL_THREADGROUPS, METAL_THREADS = 16, 64


def metal_files() -> tuple[str, str]:
    """The bridge library and metallib, found as the Metal backend finds them (lattice.engine:
    LATTICE_METAL_BRIDGE / LATTICE_METAL_LIBRARY, else lattice/_metal/ on Apple silicon)."""
    bridge, library = os.environ.get("LATTICE_METAL_BRIDGE"), os.environ.get("LATTICE_METAL_LIBRARY")
    if bridge and library:
        return bridge, library
    try:
        from ..engine import METAL_DIR, apple_silicon
    except ImportError as e:
        raise BenchError(f"Metal load needs lattice's compiled runtime: {e}") from None
    if not bridge and not apple_silicon():
        raise BenchError("Metal load needs macOS on Apple silicon (or LATTICE_METAL_BRIDGE and "
                         "LATTICE_METAL_LIBRARY)")
    return (bridge or os.path.join(METAL_DIR, "liblattice_metal.dylib"),
            library or os.path.join(METAL_DIR, "lattice.metallib"))


class MetalLoad:
    """lt_load_* of the bridge library over ctypes: burst(iterations) -> GPU seconds."""

    def __init__(self, bridge: str, library: str, threadgroups: int = METAL_THREADGROUPS,
                 threads: int = METAL_THREADS):
        import ctypes
        try:
            lib = ctypes.CDLL(bridge)
            lib.lt_load_create.restype = ctypes.c_void_p
        except (OSError, AttributeError) as e:
            raise BenchError(f"Metal load: {bridge} is not a bridge library with the GPU load "
                             f"(objc/lattice_load.mm): {e}") from None
        lib.lt_load_create.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p,
                                       ctypes.c_size_t]
        lib.lt_load_burst.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_double)]
        lib.lt_load_error.restype = ctypes.c_char_p
        lib.lt_load_error.argtypes = [ctypes.c_void_p]
        lib.lt_load_free.argtypes = [ctypes.c_void_p]
        msg = ctypes.create_string_buffer(1024)
        self.lib, self.seconds = lib, ctypes.c_double()
        self.handle = lib.lt_load_create(library.encode(), threadgroups, threads, msg, len(msg))
        if not self.handle:
            raise BenchError(msg.value.decode(errors="replace"))

    def burst(self, iterations: int) -> float:
        import ctypes
        if self.lib.lt_load_burst(self.handle, iterations, ctypes.byref(self.seconds)) != 0:
            raise BenchError(self.lib.lt_load_error(self.handle).decode(errors="replace"))
        return self.seconds.value

    def close(self):
        self.lib.lt_load_free(self.handle)


def calibrate_metal(burst, target: float, start: int = 256, limit: int = 2 ** 31) -> tuple[int, float]:
    """Loop iterations for one dispatch of about `target` GPU seconds, and that dispatch's time
    alone (best of 3). Doubles the count until a dispatch takes at least the target, then scales it
    down linearly (the fixed cost of a dispatch makes the result err slightly short)."""
    burst(start)                                            # warm up: pipeline, clocks
    n, t = start, burst(start)
    while t < target and n < limit // 2:
        n *= 2
        t = min(burst(n) for _ in range(2))
    k = max(1, min(limit, round(n * target / t))) if t > 0 else n
    return k, min(burst(k) for _ in range(3))


def run_metal(duty: float, period: float, parent: int) -> dict:
    load = MetalLoad(*metal_files())
    try:
        k, alone = calibrate_metal(load.burst, duty * period)
        print("ready", flush=True)
        bursts, measured, wall = duty_cycle(lambda: load.burst(k), period, parent)
    finally:
        load.close()
    return {"device": "metal", "threadgroups": METAL_THREADGROUPS, "threads_per_threadgroup": METAL_THREADS,
            "iterations_per_burst": k, "burst_alone_s": alone, "bursts": bursts, "wall_s": wall,
            "busy_s": bursts * alone, "busy_events_s": measured, "share": bursts * alone / wall,
            "share_events": measured / wall}


RUNNERS = {"cpu": run_cpu, "cuda": run_cuda, "metal": run_metal}


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="one background load process for lattice-bench")
    p.add_argument("--device", choices=tuple(RUNNERS), default="cpu")
    p.add_argument("--duty", type=float, default=0.02)
    p.add_argument("--period-ms", type=float, default=10.0)
    p.add_argument("--parent", type=int, default=None)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    parent = a.parent if a.parent is not None else os.getppid()
    try:
        report = RUNNERS[a.device](a.duty, a.period_ms / 1e3, parent)
    except BenchError as e:
        print(f"error: {e}", flush=True)        # the parent shows this line instead of "ready"
        sys.exit(1)
    print(json.dumps(report), flush=True)


def check_load_options(n: int, duty: float, period_ms: float, device: str):
    if n < 0:
        raise BenchError(f"--load must be >= 0, got {n}")
    if not 0 < duty <= 1:
        raise BenchError(f"--load-duty must be in (0, 1], got {duty}")
    if period_ms <= 0:
        raise BenchError(f"--load-period-ms must be > 0, got {period_ms}")
    if device not in ("cpu", "cuda", "metal"):
        raise BenchError(f"--load-device must be cpu, cuda or metal, got {device!r}")


class LoadProcesses:
    """Start n load processes, wait until each is calibrated; on exit (normal, error or Ctrl-C) stop
    them all and collect their reports. Children also exit by themselves when this process dies.
    `command`: another load program speaking the same protocol (a diagnostic's own kernel), in place
    of `python -m lattice.bench.load`."""

    def __init__(self, n: int, device: str = "cpu", duty: float = 0.02, period_ms: float = 10.0,
                 ready_timeout: float = 120.0, python: str | None = None, command: list[str] | None = None):
        check_load_options(n, duty, period_ms, device)
        self.n, self.device, self.duty, self.period_ms = n, device, duty, period_ms
        self.ready_timeout, self.python, self.command = ready_timeout, python or sys.executable, command
        self.running = False            # the processes' state, as they last answered
        self.procs: list[subprocess.Popen] = []
        self.reports: list[dict] = []

    def __enter__(self):
        cmd = self.command or [self.python, "-m", "lattice.bench.load", "--device", self.device, "--duty",
                               str(self.duty), "--period-ms", str(self.period_ms), "--parent", str(os.getpid())]
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   stdin=subprocess.PIPE, text=True))
            for p in self.procs:
                line = _readline(p, self.ready_timeout)
                if line != "ready":
                    raise BenchError(f"load process {p.pid} ({self.device}) failed to start: "
                                     f"{line or ''}{_stderr_tail(p)}")
            self.running = True
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc):
        self._stop()
        return False

    def pause(self):
        """Stop every process after its burst in progress: once this returns, none of the load's
        work is on the device."""
        if self.running:
            self._command("pause", "paused")
            self.running = False

    def resume(self):
        """Start every process again (each at a random point of its period), then wait one period,
        after which all of them are working."""
        if not self.running:
            self._command("run", "running")
            self.running = True
            time.sleep(self.period_ms / 1e3)

    def _command(self, command: str, answer: str):
        try:
            for p in self.procs:
                p.stdin.write(command + "\n")
                p.stdin.flush()
        except OSError as e:
            raise BenchError(f"load process {p.pid} ({self.device}) is gone: {e}{_stderr_tail(p)}") from None
        for p in self.procs:
            line = _readline(p, self.ready_timeout)
            if line != answer:
                raise BenchError(f"load process {p.pid} ({self.device}) did not answer {command!r}: "
                                 f"{line or ''}{_stderr_tail(p)}")

    def _stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                out, _ = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            for line in (out or "").splitlines()[::-1]:
                if line.startswith("{"):
                    self.reports.append(json.loads(line))
                    break
        self.procs = []

    def summary(self) -> dict:
        """Total share of device time the load took (sum over processes), and each report."""
        out = {"processes": self.n, "device": self.device, "duty": self.duty, "period_ms": self.period_ms,
               "reported": len(self.reports), "share_pct": 100.0 * sum(r["share"] for r in self.reports),
               "reports": self.reports}
        if self.reports and "share_events" in self.reports[0]:
            out["share_events_pct"] = 100.0 * sum(r["share_events"] for r in self.reports)
        return out


def _readline(p: subprocess.Popen, timeout: float) -> str:
    """One stdout line from a child, or "" if it exits or stays silent past the timeout."""
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return p.stdout.readline().strip()
    finally:
        sel.close()


def _stderr_tail(p: subprocess.Popen) -> str:
    try:
        p.wait(timeout=5)       # it closed stdout: it is exiting
    except subprocess.TimeoutExpired:
        return " (no answer)"
    err = p.stderr.read() if p.stderr else ""
    return "\n" + err.strip()[-2000:] if err else f" (exit code {p.returncode})"


if __name__ == "__main__":
    main()
