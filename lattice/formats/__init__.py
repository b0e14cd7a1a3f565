"""Every model file format behind one loader interface.

    ckpt = open_checkpoint(path)   # HF folder, MLX-quantized folder or .gguf file
    ckpt.config, ckpt.tensors (canonical HF name -> Tensor), ckpt.metadata (GGUF key -> value)
"""
from .gguf_header import read_gguf_metadata

__all__ = ["read_gguf_metadata"]
