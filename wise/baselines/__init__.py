"""Baseline editors behind the same interface as :class:`~wise.editor.WiseEditor`, for the benchmarks:
FT-L (constrained fine-tuning of the edited layer) and GRACE (a key-value codebook at that layer)."""

from wise.baselines.base import BaselineConfig, BaselineOutcome
from wise.baselines.ftl import FTLConfig, FTLEditor
from wise.baselines.grace import GraceConfig, GraceEditor

__all__ = ["BaselineConfig", "BaselineOutcome", "FTLConfig", "FTLEditor", "GraceConfig", "GraceEditor"]
