"""LLaDA-V in plain PyTorch: config, modules, checkpoint I/O and tokenizer."""

from .config import SHIPPED_MODEL_DIR, CheckpointError, LanguageConfig, LladaVConfig, VisionConfig
from .model import LladaV
from .tokenizer import IMAGE_TOKEN_INDEX, SpecialTokens, conversation_ids, load_tokenizer
from .weights import load_model, save_model

__all__ = ["CheckpointError", "LanguageConfig", "LladaVConfig", "VisionConfig", "LladaV", "SHIPPED_MODEL_DIR",
           "IMAGE_TOKEN_INDEX", "SpecialTokens", "conversation_ids", "load_tokenizer", "load_model", "save_model"]
