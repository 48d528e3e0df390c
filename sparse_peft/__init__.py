"""sparse-peft: fine-tune pruned LLMs with Hugging Face peft without losing their sparsity.

Importing this package registers its PEFT methods with peft, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``merge_and_unload`` work with the configs below.
"""

from ._peft_registry import register_all as _register_all
from . import ops, sparsity
from .merge import MergeReport, merge_and_unload_sparse
from .io import decode_cache_bytes, drop_decode_cache, export_dense, load_sparse, save_sparse, set_decode_cache
from .quantized import merge_and_unload_dequantized
from .evaluation import evaluate
from .sparsity import (
    SparsityReport,
    InductionReport,
    Fit4bitReport,
    cubic_sparsity,
    fit_to_4bit,
    induce_sparsity,
    is_nm_sparse,
    mask_fingerprint,
    parse_pattern,
    parse_target,
    prune,
    sparsity_report,
    weight_mask,
)
from .tuners.masked_lora import MaskedLoraConfig, MaskedLoraModel
from .tuners.spp import SPPConfig, SPPModel
from .tuners.seft import SEFTConfig, SEFTModel
from .training.seft import SEFTCallback, seft_step
from .tuners.spt import (
    GradualPruningCallback,
    SPTConfig,
    SPTModel,
    gradual_prune_step,
    load_pruning_state,
    owl_layer_sparsities,
    save_pruning_state,
    spt_prompt_lengths,
)
from .training.squarehead import (
    SquareHeadLoss,
    SquareHeadTrainer,
    cache_teacher_hidden_states,
    logit_distillation_loss,
)
from .training.spectral import SpectralNormLoss, SpectralNormTrainer, spectral_compute_loss
from .training.reconstruct import BlockReconstruction, ReconstructionReport, reconstruct
from .recipes import method_config
from .recovery import DEFAULT_RECIPES, DEFAULT_SKIP_PLACEHOLDER, Recipe, RecoveryReport, recover

_register_all()

__version__ = "0.1.0"

__all__ = [
    "MaskedLoraConfig",
    "SparsityReport",
    "cubic_sparsity",
    "prune",
    "sparsity_report",
    "MaskedLoraModel",
    "MergeReport",
    "SPPConfig",
    "SPPModel",
    "SEFTCallback",
    "SEFTConfig",
    "SEFTModel",
    "seft_step",
    "SPTConfig",
    "SPTModel",
    "GradualPruningCallback",
    "load_pruning_state",
    "save_pruning_state",
    "gradual_prune_step",
    "owl_layer_sparsities",
    "spt_prompt_lengths",
    "SquareHeadLoss",
    "SquareHeadTrainer",
    "logit_distillation_loss",
    "cache_teacher_hidden_states",
    "InductionReport",
    "fit_to_4bit",
    "Fit4bitReport",
    "induce_sparsity",
    "SpectralNormLoss",
    "SpectralNormTrainer",
    "spectral_compute_loss",
    "reconstruct",
    "ReconstructionReport",
    "BlockReconstruction",
    "is_nm_sparse",
    "mask_fingerprint",
    "merge_and_unload_sparse",
    "merge_and_unload_dequantized",
    "evaluate",
    "export_dense",
    "load_sparse",
    "save_sparse",
    "set_decode_cache",
    "drop_decode_cache",
    "decode_cache_bytes",
    "parse_pattern",
    "parse_target",
    "method_config",
    "recover",
    "Recipe",
    "RecoveryReport",
    "DEFAULT_RECIPES",
    "DEFAULT_SKIP_PLACEHOLDER",
    "weight_mask",
]
