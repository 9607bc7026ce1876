"""triforce: lossless hierarchical speculative decoding (TriForce) for long-context generation.

    import triforce
    target = triforce.load()  # the embedded SmolLM2-135M-Instruct, or a path
    engine = triforce.Engine(target, triforce.EngineSettings(method="triforce", draft="ngram"))
    print(engine.generate(open("doc.txt").read(), max_new_tokens=128).text)
"""

from .batch import generate_batch
from .engine import Engine, Generation, GenerationResult
from .errors import SettingError, TriforceError
from .head import load_head
from .loading import LoadedModel, load
from .sampling import SamplingParams
from .settings import METHODS, EngineSettings

__all__ = [
    "METHODS",
    "Engine",
    "EngineSettings",
    "Generation",
    "GenerationResult",
    "LoadedModel",
    "SamplingParams",
    "SettingError",
    "TriforceError",
    "generate_batch",
    "load",
    "load_head",
]
__version__ = "0.1.0"
