"""What every result records about where it ran: CPU, cores, memory, GPU, OS, package versions."""
from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import version, PackageNotFoundError

PACKAGES = ("lattice", "numpy", "torch", "transformers", "llama_cpp_python", "mlx", "mlx-lm", "gguf")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def gpus() -> list[dict]:
    """NVIDIA GPUs from nvidia-smi (empty when there is none)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            rows.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return rows


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def command_line() -> str:
    """The command as typed: `lattice-bench ...` when installed, `python -m lattice.bench.cli ...` otherwise."""
    prog = os.path.basename(sys.argv[0])
    if prog == "cli.py":
        prog = "python -m lattice.bench.cli"
    return " ".join([prog, shlex.join(sys.argv[1:])]).strip()


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable,
            "memory_gb": memory_gb(), "gpus": gpus(), "os": platform.platform(),
            "machine": platform.machine(), "versions": versions(),
            # other work on the machine while measuring (1, 5, 15 minute averages); read at the end
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "command": command_line(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
