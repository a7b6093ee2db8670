"""Run LLaDA-V engines: `Pipeline.load(path, backend=...)`, then `generate`, `stream` or `chat`.

    from runtime import Pipeline, GenerationConfig
    pipe = Pipeline.load("engines/", backend="onnxruntime")
    result = pipe.generate("What is in the image?", image="cat.png", config=GenerationConfig(gen_length=64))
    print(result.text, result.stats["tokens_per_second"])
"""

from .chat import Conversation
from .config import GenerationConfig
from .pipeline import GenerationResult, Pipeline, Stream
from .prompt import Request
from .runner import Runner

__all__ = ["Pipeline", "GenerationConfig", "GenerationResult", "Conversation", "Request", "Stream", "Runner"]
