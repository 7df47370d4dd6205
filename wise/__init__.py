"""WISE (Wang et al., NeurIPS 2024): lifelong model editing with a routed side memory.

Pure PyTorch + transformers; importing this package pulls in neither Ray nor vLLM.
"""

from wise.config import WiseConfig
from wise.editor import EditOutcome, StateError, WiseEditor

__all__ = ["EditOutcome", "StateError", "WiseConfig", "WiseEditor"]
