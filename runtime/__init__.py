"""Run LLaDA-V engines: `Pipeline.load(path, backend=...)`, then `generate`, `stream` or `chat`.

    from runtime import Pipeline, GenerationConfig
    pipe = Pipeline.load("engines/", backend="onnxruntime")
    result = pipe.generate("What is in the image?", image="cat.png", config=GenerationConfig(gen_length=64))
    print(result.text, result.stats.tokens_per_second)

The names are imported on first use (PEP 562), so `python -m runtime` reaches its own error handling (Ctrl-C
included) before torch is imported.
"""

import importlib

_SOURCES = {"Pipeline": "pipeline", "Stream": "pipeline", "Conversation": "chat", "GenerationConfig": "config",
            "GenerationResult": "generation.results", "GenerationStats": "generation.results",
            "PromptTooLongError": "generation.results", "Request": "generation.prompt", "Runner": "backends.runner"}

__all__ = list(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
