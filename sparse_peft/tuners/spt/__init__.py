"""SPT: sparsity-aware prompt tuning (see docs/spt.md); gradual pruning while the prompts train (pruning.py)."""

from .config import SPTConfig
from .layer import SPTAttention, SPTLayer
from .model import SPTModel, spt_prompt_lengths
from .pruning import (
    PRUNING_STATE_FILE,
    GradualPruningCallback,
    PruneStepReport,
    gradual_prune_step,
    load_pruning_state,
    owl_layer_sparsities,
    save_pruning_state,
)

__all__ = [
    "SPTAttention",
    "SPTConfig",
    "SPTLayer",
    "SPTModel",
    "spt_prompt_lengths",
    "PRUNING_STATE_FILE",
    "GradualPruningCallback",
    "PruneStepReport",
    "gradual_prune_step",
    "load_pruning_state",
    "owl_layer_sparsities",
    "save_pruning_state",
]
