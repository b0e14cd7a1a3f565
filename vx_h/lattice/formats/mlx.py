"""MLX-quantized folders (mlx-lm's `convert -q`): affine 4/8-bit weights packed in uint32.

config.json carries `quantization: {group_size, bits[, mode]}`, optionally with per-module
overrides keyed by module path (a dict, or false for a module left in float). A quantized Linear
`x.weight` is stored as uint32 [out, in * bits / 32] plus `x.scales` and `x.biases` [out, in / group];
w = q * scale + bias per group (see tensor.mlx_dequantize for the bit order).

mlx-lm saves Qwen3.5 after its own `sanitize`: conv1d weights as [C, K, 1] (MLX's channels-last
layout) and `+1` folded into the RMSNorm weights it runs as plain RMSNorm (input/post-attention
norms, the final norm, q_norm, k_norm; not the GDN output norm). A [C, K, 1] conv1d is the sign of a
sanitized folder; we transpose it back and subtract the 1 so that names, shapes and values are HF's.
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelFormatError, TensorShapeError, UnsupportedModelError
from .checkpoint import FLOAT_DTYPES, _float_tensor, canonical_name
from .tensor import Tensor

SUPPORTED_BITS = {4: "mlx_q4", 8: "mlx_q8"}
QWEN35_PLUS_ONE = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                   "model.norm.weight", ".q_norm.weight", ".k_norm.weight")


def _module_quant(quant, module, folder):
    """(bits, group_size) for a module, honouring per-module overrides."""
    spec = quant
    for key, value in quant.items():
        if isinstance(value, (dict, bool)) and canonical_name(key + ".weight") == module + ".weight":
            spec = value if isinstance(value, dict) else {} if value else None
    if spec is None:
        return None
    bits, group = spec.get("bits", quant.get("bits")), spec.get("group_size", quant.get("group_size"))
    mode = spec.get("mode", quant.get("mode", "affine"))
    if mode != "affine":
        raise UnsupportedModelError(f"{folder}: module {module!r} uses MLX quantization mode "
                                    f"{mode!r}; only 'affine' is supported")
    if bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(f"{folder}: module {module!r} is quantized to {bits!r} bits; "
                                    f"supported: {sorted(SUPPORTED_BITS)}")
    if not isinstance(group, int) or group <= 0:
        raise ModelFormatError(f"module {module!r}: invalid quantization group_size {group!r}",
                               folder / "config.json")
    return bits, group


def mlx_tensors(arrays: dict, quant, folder, model_type) -> dict:
    """arrays: canonical name -> (SafetensorsFile, stored name). Returns canonical name -> Tensor."""
    if not isinstance(quant, dict):
        raise ModelFormatError(f"'quantization' must be an object, got {quant!r}",
                               folder / "config.json")
    tensors = {}
    companions = set()
    for name, (st, stored) in arrays.items():
        if not name.endswith(".weight") or name[:-len(".weight")] + ".scales" not in arrays:
            continue
        module = name[:-len(".weight")]
        companions.update((module + ".scales", module + ".biases"))
        if module + ".biases" not in arrays:
            raise ModelFormatError(f"quantized tensor {stored!r} has scales but no biases", st.path)
        spec = _module_quant(quant, module, folder)
        if spec is None:
            raise ModelFormatError(f"tensor {stored!r} has scales but config.json says module "
                                   f"{module!r} is not quantized", st.path)
        tensors[name] = _quantized_tensor(name, arrays, *spec)

    sanitized = model_type == "qwen3_5" and any(
        n.endswith("conv1d.weight") and st.entries[s][1][-1] == 1 and len(st.entries[s][1]) == 3
        for n, (st, s) in arrays.items())
    for name, (st, stored) in arrays.items():
        if name in tensors or name in companions:
            continue
        t = _float_tensor(st, stored, name)
        if sanitized and name.endswith("conv1d.weight"):
            c, k, _ = t.shape
            t = Tensor(name, (c, 1, k), t.dtype, st.path,
                       lambda st=st, s=stored: st.array(s).transpose(0, 2, 1), spans=t.spans)
        elif sanitized and name.endswith(QWEN35_PLUS_ONE):
            t = Tensor(name, t.shape, "f32", st.path, lambda t=t: t.to_f32() - np.float32(1),
                       spans=t.spans)
        tensors[name] = t
    return tensors


def _quantized_tensor(name, arrays, bits, group):
    module = name[:-len(".weight")]
    st, stored = arrays[name]
    dtype, shape, _, _ = st.entries[stored]
    if dtype != "U32" or len(shape) != 2:
        raise TensorShapeError(f"MLX-quantized tensor {stored!r} must be 2-D U32, got {dtype} "
                               f"{list(shape)}", st.path)
    out, in_features = shape[0], shape[1] * 32 // bits
    parts, spans = {}, [st.span(stored)]
    for part in ("scales", "biases"):
        pst, pname = arrays[f"{module}.{part}"]
        pdtype, pshape, _, _ = pst.entries[pname]
        if pdtype not in FLOAT_DTYPES:
            raise TensorShapeError(f"tensor {pname!r} has dtype {pdtype}; MLX {part} must be "
                                   f"F32, F16 or BF16", pst.path)
        if in_features % group or tuple(pshape) != (out, in_features // group):
            raise TensorShapeError(
                f"tensor {pname!r} has shape {list(pshape)}, but {stored!r} {list(shape)} at "
                f"{bits} bits with group_size {group} needs [{out}, {in_features / group:g}]",
                pst.path)
        parts[part] = pst.array(pname)
        spans.append(pst.span(pname))
    return Tensor(name, (out, in_features), SUPPORTED_BITS[bits], st.path,
                  lambda: st.array(stored), scales=parts["scales"], biases=parts["biases"],
                  group_size=group, spans=spans, rows_in_order=True)
