"""open_checkpoint: one entry point for Hugging Face folders, MLX-quantized folders and GGUF files."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..errors import (ConfigError, MissingTensorError, ModelFormatError, TensorShapeError,
                      UnsupportedModelError)
from .hf_config import config_from_hf
from .safetensors import SafetensorsFile
from .tensor import Tensor

FLOAT_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


@dataclass
class Checkpoint:
    path: Path
    format: str                  # "safetensors" | "mlx" | "gguf"
    config: ModelConfig
    tensors: dict                # canonical HF name -> Tensor
    folder: Path | None = None   # HF/MLX folder (tokenizer files live there); None for GGUF
    metadata: dict = field(default_factory=dict)   # GGUF key -> value; {} for folders

    def release(self):
        """Give back the memory the weights' file data holds (once they have been converted):
        every tensor forgets its loaded data and its file pages, and the files are unmapped once
        no view of them is left. Tensors stay usable: their data is read again on next use."""
        maps = {}
        for t in self.tensors.values():
            t.release()
            maps.update((id(fmap), fmap) for fmap, _, _ in t.spans)
        for fmap in maps.values():
            fmap.close()


def open_checkpoint(path) -> Checkpoint:
    """Open a Hugging Face / MLX folder (or its config.json / *.safetensors), or a GGUF file (or a
    folder holding exactly one GGUF file and no config.json)."""
    from .gguf import open_gguf
    path = Path(path)
    if path.is_file() and (path.name == "config.json" or path.suffix == ".safetensors"):
        path = path.parent
    if path.is_dir():
        if (path / "config.json").is_file():
            return _open_folder(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return open_gguf(ggufs[0])
        if ggufs:
            raise ModelFormatError(f"folder has several GGUF files, pick one: "
                                   f"{', '.join(g.name for g in ggufs)}", path)
        raise ConfigError(f"{path / 'config.json'}: config.json not found (and no GGUF file)")
    if path.is_file():
        return open_gguf(path)
    raise ModelFormatError("no such model file or folder", path)


def canonical_name(name: str) -> str | None:
    """HF name as the family code expects it; None for tensors that are not part of the text model
    (Qwen3.5's vision tower and multi-token-prediction head)."""
    if name.startswith(("model.visual.", "visual.", "mtp.", "model.mtp.")):
        return None
    for prefix, repl in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    return name


def _read_json(path: Path, what):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: {what} not found") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: cannot parse {what}: {e}") from e


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise ModelFormatError("index has no valid 'weight_map'", index)
        files = []
        for name in dict.fromkeys(weight_map.values()):
            f = folder / name
            if Path(name).name != name or not f.is_file():
                raise ModelFormatError(f"shard {name!r} listed in the index is missing", index)
            files.append(f)
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelFormatError("folder has neither model.safetensors nor "
                           "model.safetensors.index.json", folder)


def _open_folder(folder: Path) -> Checkpoint:
    raw_cfg = _read_json(folder / "config.json", "config.json")
    config = config_from_hf(raw_cfg, folder / "config.json")
    quant = raw_cfg.get("quantization")
    if quant is None and isinstance(raw_cfg.get("quantization_config"), dict):
        method = raw_cfg["quantization_config"].get("quant_method")
        if method is not None:
            raise UnsupportedModelError(f"{folder}: Hugging Face quantization method {method!r} "
                                        f"is not supported (MLX-quantized folders and GGUF are)")
        quant = raw_cfg["quantization_config"]
    arrays = {}   # canonical name -> (SafetensorsFile, stored name)
    for f in _weight_files(folder):
        st = SafetensorsFile(f)
        for name in st.entries:
            canon = canonical_name(name)
            if canon is None:
                continue
            if canon in arrays:
                raise ModelFormatError(f"tensor {name!r} appears in two shards", f)
            arrays[canon] = (st, name)
    if quant is not None:
        from .mlx import mlx_tensors
        tensors = mlx_tensors(arrays, quant, folder, config.model_type)
        fmt = "mlx"
    else:
        tensors = {canon: _float_tensor(st, name, canon) for canon, (st, name) in arrays.items()}
        fmt = "safetensors"
    check_against_config(config, tensors, folder)
    return Checkpoint(folder, fmt, config, tensors, folder=folder)


def _float_tensor(st: SafetensorsFile, name, canon) -> Tensor:
    dtype, shape, _, _ = st.entries[name]
    if dtype not in FLOAT_DTYPES:
        raise TensorShapeError(f"tensor {name!r} has dtype {dtype}; weights must be "
                               f"F32, F16 or BF16", st.path)
    return Tensor(canon, shape, FLOAT_DTYPES[dtype], st.path, lambda: st.array(name),
                  spans=[st.span(name)], rows_in_order=True)


def check_against_config(config: ModelConfig, tensors: dict, path):
    """The cheap consistency checks every format shares: the embedding table matches the config."""
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise MissingTensorError("checkpoint has no tensor 'model.embed_tokens.weight'", path)
    want = (config.vocab_size, config.hidden_size)
    if emb.shape != want:
        raise TensorShapeError(
            f"tensor 'model.embed_tokens.weight' has shape {emb.shape} but the config says "
            f"vocab_size x hidden_size = {want}", path)

