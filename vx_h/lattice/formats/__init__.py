"""Every model file format behind one loader interface.

    ckpt = open_checkpoint(path)   # HF folder, MLX-quantized folder or .gguf file
    ckpt.config    # lattice.config.ModelConfig
    ckpt.tensors   # canonical Hugging Face name -> Tensor (HF orientation, memory-mapped)
    ckpt.metadata  # GGUF key -> plain Python value ({} for folders)
    ckpt.release() # once converted: file pages given back, files unmapped (tensors stay readable)
"""
from .checkpoint import Checkpoint, open_checkpoint
from .gguf_header import read_gguf_metadata
from .tensor import Tensor

__all__ = ["Checkpoint", "Tensor", "open_checkpoint", "read_gguf_metadata"]
