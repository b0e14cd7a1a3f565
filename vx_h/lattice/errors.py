"""Every error Lattice raises on bad input is a LatticeError subclass that names what was wrong
(file, tensor, shape, parameter). Callers can catch LatticeError alone."""


class LatticeError(Exception):
    """Base class of all Lattice errors."""


class ModelFormatError(LatticeError):
    """A model file is truncated, corrupt or inconsistent (header lengths, offsets, counts)."""

    def __init__(self, message, path=None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class MissingTensorError(ModelFormatError):
    """A tensor the architecture needs is not in the checkpoint."""


class TensorShapeError(ModelFormatError):
    """A tensor has the wrong shape or dtype for the config."""


class UnsupportedModelError(LatticeError):
    """Unknown architecture / model_type, unknown GGUF tensor type, unsupported feature."""


class ConfigError(LatticeError):
    """config.json / GGUF metadata is missing a field or has an invalid value."""


class TokenizerError(LatticeError):
    """No usable tokenizer, or a token id out of range."""


class ChatTemplateError(LatticeError):
    """A chat template failed to render or tried to escape the sandbox."""


class ContextLengthError(LatticeError):
    """The prompt (plus generation) does not fit in the context."""


class ModelNotFoundError(LatticeError):
    """A model path, alias or repo id could not be resolved or downloaded."""


class SamplingError(LatticeError, ValueError):
    """An invalid sampling parameter (temperature < 0, top_p outside (0, 1], ...)."""


class NumericalError(LatticeError):
    """NaN or Inf appeared in logits or state."""


class BackendError(LatticeError):
    """A backend is unavailable here or failed."""
