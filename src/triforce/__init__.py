"""triforce: lossless hierarchical speculative decoding (TriForce) for long-context generation."""

from .errors import TriforceError
from .loading import LoadedModel, load

__all__ = ["LoadedModel", "TriforceError", "load"]
__version__ = "0.1.0"
