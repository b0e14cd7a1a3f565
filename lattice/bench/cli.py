"""`lattice-bench`: decode and prefill throughput, engines side by side, with and without contention."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys

import click

from ..errors import LatticeError
from .engines import ENGINES
from .load import check_load_options
from .machine import machine_info
from .make_model import GGUF_TYPES, HF_DTYPES, MODELS, model_spec, write_gguf, write_hf
from .engines import make_engine
from .runner import EngineHost, EngineWorker, Settings, loss_difference, measure
from .stats import BenchError

METHOD = """\
\b
Method (see bench/README.md):
- Decode tok/s by the slope method: from the same fixed prompt, generate N1 and
  N2 tokens ignoring EOS (greedy); tok/s = (N2 - N1) / (T(N2) - T(N1)), so load,
  prefill and per-call overhead cancel. Defaults N1=64, N2=512, 2 warm-up runs,
  15 measured runs; each run is one N1 and one N2 generation (paired; the order
  alternates between runs).
- Prefill tok/s = P / time to first token of a P-token prompt (P=512).
- Statistics on the per-run slopes: median, 10% trimmed mean, stdev, a 95%
  confidence interval of the mean from Student's t, spread % = (max - min) / mean.
  Plain float arithmetic (math.fsum); nothing is truncated.
- Each engine runs in its own worker process, which loads the model once; the
  measured runs are interleaved between engines (run 1 of A, run 1 of B, run 2
  of B, run 2 of A, ...: who goes first rotates), warm-ups first, so a change of
  machine load hits every engine alike. Same thread count and prompt token ids
  for every engine. Results record the machine, versions, model file,
  quantization, backend, threads, runtime counters (Lattice: submissions and
  backend calls per token, dispatches per step) and the exact command line.
  --one-at-a-time: each engine instead goes through the whole protocol (warm-up,
  runs, load) with no other engine loaded: under CUDA MPS an idle engine is a
  client of the one server, and idle clients slow some engines.
- --load N: N background processes run a small piece of work every period
  (default 0.2 ms every 10 ms, a 2% duty cycle) on the same device (cuda:
  matmuls through torch; metal: one compute dispatch of a busy loop per period
  through the Metal bridge, timed by GPUStartTime/GPUEndTime; cpu: a Python
  loop). The unloaded runs bracket the loaded ones (half before the load
  starts, half after it stops), so that a steady drift does not pass for the
  load's effect. The report gives each engine's throughput and spread with and
  without load, the loss % (of the medians; of the means with a 95% CI), the
  unloaded drift, and the share of device time the load itself took.
"""


@click.group(help="Benchmark LLM engines on this machine.\n\n" + METHOD)
def main():
    pass


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _default_load_device() -> str:
    """metal on Apple silicon, cuda where torch sees a GPU, else cpu."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


@main.command("run", help="Measure engines side by side.\n\n" + METHOD + """
\b
Engines (-e, repeatable; each optional, "skipped: not installed" otherwise):
  lattice[:BACKEND[:QUANT]]   lattice.load(path, backend=BACKEND, quant=QUANT)
  llama.cpp[:gpu]             llama-cpp-python (gpu: all layers offloaded)
  transformers[:DTYPE[:DEV]]  DTYPE bf16|f16|f32, DEV cpu|cuda
  mlx                         mlx-lm
Lattice and llama.cpp read --gguf (Lattice falls back to --hf); transformers and
MLX read --hf.
""")
@click.option("--gguf", "gguf_path", type=click.Path(exists=True, dir_okay=False), help="GGUF model file.")
@click.option("--hf", "hf_path", type=click.Path(exists=True, file_okay=False),
              help="Hugging Face model folder (the same weights, for transformers / MLX).")
@click.option("-e", "--engine", "engines", multiple=True, default=("lattice", "llama.cpp"), show_default=True,
              help="Engine spec (repeatable).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads for every engine [usable CPUs].")
@click.option("--n1", type=int, default=64, show_default=True, help="Tokens of the short generation.")
@click.option("--n2", type=int, default=512, show_default=True, help="Tokens of the long generation.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Warm-up runs (discarded).")
@click.option("-r", "--runs", type=int, default=15, show_default=True, help="Measured runs.")
@click.option("-p", "--pp", type=int, default=512, show_default=True, help="Prefill prompt length.")
@click.option("--prompt-tokens", type=int, default=16, show_default=True, help="Decode prompt length.")
@click.option("--load", "load", type=int, default=0, show_default=True,
              help="Background load processes for a second, loaded measurement.")
@click.option("--load-duty", type=float, default=0.02, show_default=True,
              help="Fraction of each period a load process works.")
@click.option("--load-period-ms", type=float, default=10.0, show_default=True, help="Load period.")
@click.option("--load-device", type=click.Choice(["auto", "cpu", "cuda", "metal"]), default="auto",
              show_default=True,
              help="Where the load runs (auto: metal on Apple silicon, cuda when torch sees a GPU, else cpu).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write all results as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write summary rows as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw decode tok/s distributions (needs matplotlib: pip install 'lattice[bench]').")
@click.option("--python", "pythons", multiple=True, metavar="KIND=PYTHON",
              help="Interpreter for one engine kind, e.g. llama.cpp=/opt/venv/bin/python (repeatable).")
@click.option("--one-at-a-time", is_flag=True,
              help="Measure the engines one after another, each with the others not loaded (its own "
                   "warm-up, runs and load), instead of interleaved: under CUDA MPS idle engines are "
                   "clients that slow some others.")
@click.option("--in-process", is_flag=True,
              help="Run engines in this process, still interleaved (debugging: errors raise).")
def run_cmd(gguf_path, hf_path, engines, threads, n1, n2, warmup, runs, pp, prompt_tokens, load, load_duty,
            load_period_ms, load_device, json_path, csv_path, plot_path, pythons, one_at_a_time, in_process):
    if plot_path:
        _require_matplotlib()
    if not gguf_path and not hf_path:
        raise click.UsageError("give a model: --gguf FILE and/or --hf FOLDER")
    threads = threads or _default_threads()
    s = Settings(n1=n1, n2=n2, warmup=warmup, runs=runs, pp=pp, prompt_tokens=prompt_tokens, threads=threads,
                 load=load, load_device=_default_load_device() if load_device == "auto" else load_device,
                 load_duty=load_duty, load_period_ms=load_period_ms, load_python=sys.executable,
                 one_at_a_time=one_at_a_time)
    interpreters = {}
    for item in pythons:
        kind, sep, exe = item.partition("=")
        if not sep or not kind or not exe:
            raise click.BadParameter(f"expected KIND=PYTHON, got {item!r}", param_hint="--python")
        interpreters[kind] = exe
    try:
        s.validate()
        check_load_options(load, load_duty, load_period_ms, s.load_device)
    except LatticeError as e:
        raise click.BadParameter(str(e)) from None
    for spec in engines:
        try:
            make_engine(spec, ENGINES)
        except BenchError as e:
            raise click.BadParameter(str(e), param_hint="--engine") from None
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    files = {"gguf": gguf_path, "hf": hf_path}
    hosts = [EngineHost(spec, files, s, ENGINES) if in_process else
             EngineWorker(spec, files, s, interpreters.get(spec.split(":")[0])) for spec in engines]
    click.echo(f"measuring {', '.join(engines)} ({'one at a time' if one_at_a_time else 'interleaved'}) ...",
               err=True)
    results = measure(hosts, s)
    for rec in results:
        if rec["status"] != "ok":
            click.echo(f"[{rec['engine']}] {rec['status']}: {rec['reason']}", err=True)
    doc = {"machine": machine_info(), "settings": vars(s), "files": files, "results": results}
    click.echo(render_report(doc))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
    if csv_path:
        write_csv(doc, csv_path)
    if plot_path:
        plot(doc, plot_path)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'lattice[bench]' "
                                   "(or pip install matplotlib)") from None


def _fmt(x, digits=2):
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


def render_report(doc: dict) -> str:
    s, m = doc["settings"], doc["machine"]
    gpu = ", ".join(g["name"] for g in m["gpus"]) or "none"
    busy = m.get("load_average")
    out = [f"machine: {m['cpu']} ({m['cpus_usable']} usable CPUs), GPU: {gpu}; threads {s['threads']}"
           + (f"; load average {busy[0]:.2f} {busy[1]:.2f} {busy[2]:.2f} at the end" if busy else "")]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    tg = f"tg{s['n2'] - s['n1']}"
    rows = []
    for r in ok:
        info = r.get("info", {})
        common = [r["engine"], os.path.basename(r["model_file"]), str(info.get("quant", "")),
                  str(info.get("backend", "")), str(s["threads"])]
        for phase in ("unloaded", "loaded"):
            if phase not in r:
                continue
            tag = "" if phase == "unloaded" else f" +load{s['load']}"
            p = r[phase]
            rows.append(common + [f"pp{s['pp']}{tag}", f"{_fmt(p['prefill']['mean'])} ± {_fmt(p['prefill']['stdev'])}"])
            rows.append(common + [f"{tg}{tag}", f"{_fmt(p['decode']['mean'])} ± {_fmt(p['decode']['stdev'])}"])
    if rows:
        out += ["", _table(["engine", "model", "quant", "backend", "threads", "test", "t/s"], rows),
                f"({tg}: decode by the slope between {s['n1']} and {s['n2']} generated tokens)"]
    rows = []
    for r in ok:
        for phase in ("unloaded", "loaded"):
            if phase not in r:
                continue
            d, t = r[phase]["decode"], r[phase]["ttft_ms"]
            rows.append([r["engine"], phase, f"{s['n1']}->{s['n2']}", str(d["n"]), _fmt(d["median"]),
                         _fmt(d["trimmed_mean"]), f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]",
                         _fmt(d["stdev"]), _fmt(d["spread_pct"]), _fmt(t["median"], 1)])
    if rows:
        out += ["", _table(["engine", "phase", "N1->N2", "runs", "median t/s", "trimmed mean",
                            "95% CI (mean)", "stdev", "spread %", f"TTFT pp{s['pp']} ms"], rows)]
        for r in ok:
            for phase in ("unloaded", "loaded"):
                for d in r.get(phase, {}).get("discarded_runs", []):
                    out.append(f"{r['engine']} ({phase}): run {d['run']} discarded, T(N2) = {d['t_n2']:.3f} s "
                               f"<= T(N1) = {d['t_n1']:.3f} s (the short generation stalled)")
    rows = []
    for r in ok:
        if "loaded" not in r:
            continue
        u, lo, ld = r["unloaded"]["decode"], r["loaded"]["decode"], r["loaded"]["load"]
        lm, drift = r.get("loss_of_means", {}).get("decode"), r.get("unloaded_drift_pct")
        tl = r.get("time_lost_us", {}).get("decode")
        rows.append([r["engine"], _fmt(u["median"]), _fmt(u["spread_pct"]), _fmt(lo["median"]),
                     _fmt(lo["spread_pct"]), _fmt(r["degradation_pct"]["decode"]),
                     f"{_fmt(lm['loss_pct'])} [{_fmt(lm['ci_low'])}, {_fmt(lm['ci_high'])}]" if lm else "",
                     f"{_fmt(tl['us'], 1)} [{_fmt(tl['ci_low'], 1)}, {_fmt(tl['ci_high'], 1)}]" if tl else "",
                     _fmt(drift) if drift is not None else "", _fmt(r["degradation_pct"]["prefill"]),
                     _fmt(ld["share_pct"])])
    if rows:
        out += ["", _table(["engine", "decode t/s", "spread %", f"+load{s['load']} t/s", "spread %",
                            "decode loss %", "of means [95% CI]", "us/token lost [95% CI]", "drift %",
                            "prefill loss %", "load share %"], rows),
                "(loss = 1 - loaded / unloaded, of the medians, then of the means with a 95% CI; us/token "
                "lost: the decode time per token the load added; drift: how much slower the unloaded runs "
                "after the load were than those before it)",
                *_loss_differences([r for r in ok if "loss_of_means" in r]),
                f"(load: {s['load']} x {s['load_device']} processes, {s['load_duty'] * 100:g}% of every "
                f"{s['load_period_ms']:g} ms; share = device time the load's own work took"
                + (", % of one core per process, summed)" if s["load_device"] == "cpu" else
                   ("; by CUDA events, queueing included: " if s["load_device"] == "cuda" else
                    "; by GPU timestamps, other work in between included: ")
                   + _fmt(next(r["loaded"]["load"].get("share_events_pct", math.nan) for r in ok if "loaded" in r))
                   + "%)")]
    rows = []
    for r in ok:
        for phase in ("unloaded", "loaded"):
            c = r.get(phase, {}).get("counters")
            if c:
                rows.append([r["engine"], phase, str(c["backend"]), str(c["dispatches_per_step"]),
                             _fmt(c["steps_per_token"], 3), _fmt(c["submissions_per_token"], 3),
                             _fmt(c["backend_calls_per_token"], 3), _fmt(c["api_calls_per_token"], 1)])
    if rows:
        out += ["", _table(["engine", "phase", "runtime", "dispatches/step", "steps/token", "submissions/token",
                            "backend calls/token", "API calls/token"], rows),
                "(runtime counters over the measured runs; submissions: Metal command buffers, CUDA graph "
                "launches; API calls: device API calls of the host, CPU kernel runs on the CPU)"]
    rows = [[r["engine"], os.path.basename(r["model_file"]), _fmt(_size_mb(r["model_file"]), 1),
             _fmt(r.get("peak_rss_mb") or math.nan, 1), _fmt(r["load_s"])] for r in ok]
    if rows:
        out += ["", _table(["engine", "model", "model MB", "peak RSS MB", "load s"], rows)]
    for r in doc["results"]:
        if r["status"] != "ok":
            out.append(f"{r['engine']}: {r['status']}: {r['reason']}")
    out.append(f"command: {m['command']}")
    return "\n".join(out)


def _loss_differences(recs: list[dict]) -> list[str]:
    """The first engine's decode loss minus each other engine's, with a 95% CI."""
    out = []
    for r in recs[1:]:
        d = loss_difference(recs[0]["loss_of_means"]["decode"], r["loss_of_means"]["decode"])
        out.append(f"decode loss, {recs[0]['engine']} minus {r['engine']}: {d['points']:+.2f} points "
                   f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] (95% CI; an interval below 0: "
                   f"{recs[0]['engine']} lost less)")
    return out


def _size_mb(path: str) -> float:
    """Bytes of a model file, or of every file in a model folder, in MB."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if os.path.isfile(os.path.join(path, f))) / 1e6
    return os.path.getsize(path) / 1e6 if os.path.exists(path) else float("nan")


CSV_FIELDS = ["engine", "status", "phase", "metric", "n", "mean", "median", "trimmed_mean", "stdev", "ci_low",
              "ci_high", "min", "max", "spread_pct", "model_file", "backend", "quant", "threads"]


def write_csv(doc: dict, path: str):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in doc["results"]:
            if r["status"] != "ok":
                w.writerow({"engine": r["engine"], "status": r["status"]})
                continue
            for phase in ("unloaded", "loaded"):
                for metric in ("decode", "prefill", "ttft_ms"):
                    if phase in r:
                        w.writerow({"engine": r["engine"], "status": "ok", "phase": phase, "metric": metric,
                                    **r[phase][metric], "model_file": r["model_file"],
                                    "backend": r["info"].get("backend"), "quant": r["info"].get("quant"),
                                    "threads": doc["settings"]["threads"]})


def plot(doc: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = []
    for r in doc["results"]:
        for phase in ("unloaded", "loaded"):
            if r["status"] == "ok" and phase in r:
                series.append((f"{r['engine']}\n{phase}", r[phase]["decode_tps"]))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(series)), 4))
    if series:
        ax.boxplot([v for _, v in series], showmeans=True)
        for i, (_, v) in enumerate(series, 1):
            ax.scatter([i] * len(v), v, s=10, alpha=0.6)
        ax.set_xticks(range(1, len(series) + 1), [k for k, _ in series])
    s = doc["settings"]
    ax.set_ylabel(f"decode tok/s (slope {s['n1']}->{s['n2']})")
    ax.set_title(doc["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@main.command("make-model", help="""Write a shape-exact checkpoint with random weights.

\b
MODEL: one of """ + ", ".join(sorted(MODELS)) + """.
Writes OUT as a Hugging Face folder (config.json, model.safetensors, tokenizer.json
with a placeholder byte-level vocabulary) and, with --gguf, OUT.gguf (or --gguf-out)
with the same weights laid out as llama.cpp's converter does.
""")
@click.argument("model", type=click.Choice(sorted(MODELS)))
@click.option("--random", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder of the HF checkpoint.")
@click.option("--gguf", "gguf_type", type=click.Choice(GGUF_TYPES), default=None,
              help="Also write GGUF with this tensor type.")
@click.option("--gguf-out", type=click.Path(dir_okay=False), default=None, help="GGUF path [OUT.gguf].")
@click.option("--dtype", type=click.Choice(sorted(HF_DTYPES)), default="bf16", show_default=True,
              help="Tensor dtype of the HF checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tiny", is_flag=True, help="Same structure, tiny sizes (tests).")
@click.option("--layers", type=int, default=None, help="Override the number of layers.")
def make_model_cmd(model, out, gguf_type, gguf_out, dtype, seed, tiny, layers):
    try:
        spec = model_spec(model, tiny=tiny, **({"num_hidden_layers": layers} if layers is not None else {}))
        write_hf(spec, out, seed=seed, dtype=dtype)
        click.echo(f"wrote {out}")
        if gguf_type:
            path = gguf_out or out.rstrip("/") + ".gguf"
            write_gguf(spec, path, seed=seed, outtype=gguf_type, dtype=dtype)
            click.echo(f"wrote {path}")
    except LatticeError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
