"""Accuracy recovery after pruning as one call: prune (optionally with Sparsity Induction), optionally
reconstruct block by block, fine-tune with a sparsity-preserving PEFT method, merge, check.

    merged, report = sp.recover(model, train_ids, sparsity=0.5)

``sp.recover`` runs the stages of a ``Recipe`` (``DEFAULT_RECIPES`` holds one per target); each
stage is also a function of its own here (``prune_stage``, ``reconstruct_stage``, ``fine_tune``,
``merge``, ``check_sparsity``) for scripts that measure between them.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._progress import progress
from .data import IGNORED_LABEL, random_windows
from .merge import merge_and_unload_sparse
from .recipes import METHODS, method_config
from .sparsity import linear_view, named_linears, parse_pattern, prune, sparsity_report
from .sparsity.prune import ALLOCATIONS
from .sparsity.selection import unstructured_zero_count
from .training.reconstruct import reconstruct

PRUNERS = ("magnitude", "wanda", "sparsegpt")
LOSSES = ("ce", "squarehead")
RECONSTRUCT_OPTIONS = ("epochs", "lr", "batch_size")
TUNE_DENSE_OPTIONS = ("steps", "lr", "r")
SEFT_TOTALS = ("dropped", "grown", "regrown", "pruned")


@dataclass(frozen=True)
class Recipe:
    """What ``sp.recover`` runs, stage by stage.

    Tune dense (off by default): ``tune_dense``: ``True`` or a dict of ``steps`` (default half of
    ``steps``), ``lr`` (default ``lr``) and ``r`` (default 8) trains plain LoRA on the dense model with
    CE for the first ``steps`` of the budget's windows and merges it, so the pruner, the
    reconstruction and the SquareHead teacher all start from a model already fitted to the text; the
    method then trains on the remaining ``steps - tune_dense["steps"]`` windows.
    Prune: ``pruner`` (``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``) on ``calib_samples``
    random windows of ``calib_seq_len`` training tokens, every layer at the target sparsity
    (``allocation="uniform"``) or at OWL's outlier-weighted share of the same global count
    (``"owl"``; unstructured targets only); ``induce``: ``True`` or a dict of
    ``sp.induce_sparsity`` options (e.g. ``{"alpha": 0.5}``) folds Sparsity Induction's scales into
    the model first, inside ``sp.prune`` (Llama-style models only). Reconstruct: ``reconstruct``:
    ``True`` or a dict of ``sp.reconstruct``'s ``epochs``, ``lr``, ``batch_size``; off by default.
    Fine-tune: ``method`` (one of ``sp.recipes.METHODS``, or None to stop after pruning) with
    ``method_options`` (the fields ``sp.method_config`` takes, e.g. ``{"r": 64}``), AdamW at ``lr``
    with a cosine schedule and no warm-up over ``steps`` batches of ``batch_size`` random windows
    of ``seq_len`` tokens; ``loss`` ``"ce"``, or ``"squarehead"``: CE + ``squarehead_lambda`` x
    SquareHead (hidden states) + ``logit_lambda`` x KL(teacher || student) from the dense model.
    ``seed`` draws the calibration windows (``seed``) and the training windows (``seed + 1``) and
    seeds the adapter's initialisation. ``dataclasses.replace(recipe, steps=50)`` changes a field.
    """

    pruner: str = "wanda"
    allocation: str = "uniform"
    induce: bool | dict = False
    reconstruct: bool | dict = False
    tune_dense: bool | dict = False
    method: str | None = "masked_lora"
    method_options: dict = field(default_factory=dict)
    lr: float = 1e-3
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    loss: str = "ce"
    squarehead_lambda: float = 1.0
    logit_lambda: float = 0.0
    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        for name in ("induce", "reconstruct", "tune_dense"):  # no options: the stage with its defaults
            if getattr(self, name) == {}:
                object.__setattr__(self, name, True)
        problems = [
            f"pruner {self.pruner!r} is not one of {PRUNERS}" if self.pruner not in PRUNERS else None,
            f"method {self.method!r} is not None or one of {METHODS}" if self.method not in (None, *METHODS) else None,
            f"loss {self.loss!r} is not one of {LOSSES}" if self.loss not in LOSSES else None,
            f"allocation {self.allocation!r} is not one of {ALLOCATIONS}" if self.allocation not in ALLOCATIONS
            else None,
            f"lr must be a number > 0, got {self.lr!r}" if not (isinstance(self.lr, (int, float)) and self.lr > 0)
            else None,
            *(f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
              for name in ("steps", "batch_size", "seq_len", "calib_samples", "calib_seq_len")
              if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int)
              or getattr(self, name) < 1),
            f"seed must be an integer >= 0, got {self.seed!r}" if not isinstance(self.seed, int) or self.seed < 0
            else None,
            f"squarehead_lambda and logit_lambda must be >= 0, got {self.squarehead_lambda!r} and "
            f"{self.logit_lambda!r}" if min(self.squarehead_lambda, self.logit_lambda) < 0 else None,
            f"logit_lambda {self.logit_lambda!r} needs loss 'squarehead' (the teacher)"
            if self.logit_lambda and self.loss != "squarehead" else None,
            *(f"{name} must be True, False or a dict of options, got {getattr(self, name)!r}"
              for name in ("induce", "reconstruct", "tune_dense")
              if not isinstance(getattr(self, name), (bool, dict))),
            f"reconstruct takes {RECONSTRUCT_OPTIONS}, got {sorted(self.reconstruct)}"
            if isinstance(self.reconstruct, dict) and set(self.reconstruct) - set(RECONSTRUCT_OPTIONS) else None,
            f"method 'spt' prunes gradually while it trains, with pruner 'wanda' or 'magnitude', got {self.pruner!r}"
            if self.method == "spt" and self.pruner == "sparsegpt" else None,
            "induce runs before one-shot pruning; method 'spt' prunes gradually instead"
            if self.method == "spt" and self.induce else None,
            "reconstruct follows one-shot pruning; method 'spt' prunes gradually instead"
            if self.method == "spt" and self.reconstruct else None,
            "allocation 'owl' sets the one-shot pruning's layer sparsities; method 'spt' prunes gradually instead"
            if self.method == "spt" and self.allocation != "uniform" else None,
            self._tune_dense_problem(),
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"Recipe: {problems[0]}")

    def _tune_dense_problem(self) -> str | None:
        if not self.tune_dense or isinstance(self.steps, bool) or not isinstance(self.steps, int):
            return None  # off, or steps already refused
        unknown = sorted(set(self.tune_dense) - set(TUNE_DENSE_OPTIONS)) if isinstance(self.tune_dense, dict) else []
        if unknown:
            return f"tune_dense takes {TUNE_DENSE_OPTIONS}, got {unknown[0]!r}"
        options, most = self.tune_dense_options(), self.steps - (self.method is not None)
        steps, lr, r = options["steps"], options["lr"], options["r"]
        if most < 1 or (self.tune_dense is True and steps < 1):
            return f"tune_dense takes some of steps={self.steps} and the method keeps the rest: they cannot be split"
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
            return (f"tune_dense steps must be an integer in [1, {most}] (steps={self.steps}"
                    f"{', of which the method keeps at least one' if self.method is not None else ''}), got {steps!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            return f"tune_dense r must be an integer >= 1, got {r!r}"
        return None if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 else (
            f"tune_dense lr must be a number > 0, got {lr!r}")

    def tune_dense_options(self) -> dict:
        """``tune_dense`` with its defaults filled in (``{}`` when it is off): steps, lr, r."""
        if not self.tune_dense:
            return {}
        given = self.tune_dense if isinstance(self.tune_dense, dict) else {}
        return {"steps": self.steps // 2, "lr": self.lr, "r": 8, **given}

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict; ``Recipe(**d)`` builds it back."""
        return dataclasses.asdict(self)


#: The recipe ``sp.recover`` runs when given none, per target (``"0.5"``, ``"0.7"``, ``"2:4"``,
#: else ``"fallback"``): the best measured on SmolLM2-135M at 200 steps of 4 x 128 tokens
#: (docs/results/recovery.md). PROVISIONAL: the fallback recipe and the 50% one's pruner, method and
#: loss were chosen by their perplexity on the same wiki.test windows they are scored on, not on a
#: validation split, so they may be slightly overfitted to that text. The 50% one's dense tuning, the
#: 70% one's OWL allocation, the 50% and 70% ones' placeholder (``DEFAULT_SKIP_PLACEHOLDER``) and
#: reconstruction (against the same recipe without it) and the 2:4 one (against the previous 2:4
#: recipe, Wanda + masked LoRA) were chosen on the validation split.
DEFAULT_RECIPES = {
    # 28.4 ppl with DEFAULT_SKIP_PLACEHOLDER's "<unk>" left out of the loss (both stages), trained on 90% of
    # the text; its dense tuning (the first half of the steps: LoRA r=8 at lr 2e-3), its reconstruction and
    # the placeholder left out chosen on the validation split (22.7 against 26.5 and 27.5; 33.7 against
    # 37.1 scored without the placeholder)
    "0.5": Recipe(pruner="sparsegpt", induce=True, reconstruct={"epochs": 1, "lr": 3e-3}, tune_dense=True,
                  method="masked_lora", method_options={"r": 64}, lr=2e-3, loss="squarehead", squarehead_lambda=0.1,
                  logit_lambda=2.0),
    # 59.9 ppl with DEFAULT_SKIP_PLACEHOLDER's "<unk>" left out of the loss, trained on 90% of the text;
    # OWL chosen on the validation split over every layer at 70% (62.5; on every token 64.8)
    "0.7": Recipe(pruner="sparsegpt", allocation="owl", induce=True, reconstruct={"epochs": 1, "lr": 3e-3},
                  method="masked_lora", lr=2e-3),
    # 43.6 ppl, trained on 90% of the text; chosen on the validation split over Wanda + masked LoRA (57.6)
    "2:4": Recipe(pruner="sparsegpt", induce=True, reconstruct={"epochs": 1, "lr": 3e-3}, method="masked_lora",
                  lr=2e-3),
    # any other target: the 70% recipe without its reconstruction and OWL, which measured 33.1 at 50%
    "fallback": Recipe(pruner="sparsegpt", induce=True, method="masked_lora", lr=2e-3),
}


#: ``sparse-peft recover``'s ``--skip-placeholder`` when the flag is not given, per target (keys as in
#: ``DEFAULT_RECIPES``): the text whose tokens the fine-tuning takes no loss on (they stay in the
#: context; with ``tune_dense`` neither stage takes a loss on them). ``"<unk>"``, WikiText's ``.tokens``
#: placeholder for rare words, where the validation split chose leaving it out (50% and 70%, scored
#: without it); 2:4 and the fallback were not measured with it, so they keep every token. A text
#: without the placeholder trains on every token either way.
DEFAULT_SKIP_PLACEHOLDER = {"0.5": "<unk>", "0.7": "<unk>"}


def _target_key(target: dict) -> str:
    return target.get("pattern") or f"{target.get('sparsity', 0):g}"


def default_recipe(target: dict) -> Recipe:
    """``DEFAULT_RECIPES``' entry for ``target`` (``{"sparsity": 0.5}`` or ``{"pattern": "2:4"}``)."""
    return DEFAULT_RECIPES.get(_target_key(target), DEFAULT_RECIPES["fallback"])


def default_skip_placeholder(target: dict) -> str:
    """``DEFAULT_SKIP_PLACEHOLDER``' entry for ``target``; ``""`` (every token trained on) where it has none."""
    return DEFAULT_SKIP_PLACEHOLDER.get(_target_key(target), "")


# --- a Recipe as command-line flags: `sparse-peft recover` and benchmarks/recovery.py take the same ------

#: Each method option as a flag: flag -> (methods it configures, their config field, type, help).
METHOD_FLAGS = {
    "--r": (("lora", "masked_lora"), "r", int, "LoRA / masked LoRA rank (lora_alpha 2r)"),
    "--spp-r": (("spp",), "r", int, "SPP rank"),
    "--spp-alpha": (("spp",), "alpha", float, "SPP update scale"),
    "--seft-density": (("seft",), "density", float, "SEFT trainable fraction per layer"),
    "--seft-interval": (("seft",), "update_interval", int, "SEFT steps between topology updates"),
    "--seft-drop-fraction": (("seft",), "drop_fraction", float, "SEFT fraction dropped per update"),
    "--seft-grow-window": (("seft",), "grow_window", int, "SEFT steps of gradients that choose the growth"),
    "--seft-grow-into": (("seft",), "grow_into", ("any", "kept"), "SEFT growth into any position (the mask moves) "
                         "or only the pruned model's nonzeros (the mask stays)"),
    "--spt-prompt-length": (("spt",), "base_prompt_length", int, "SPT base prompt length p_base"),
    "--spt-initial-sparsity": (("spt",), "initial_sparsity", float, "SPT schedule s_0"),
    "--spt-prune-end": (("spt",), "prune_end_step", int, "SPT step reaching the target (default steps/2)"),
    "--spt-prune-steps": (("spt",), "num_prune_steps", int, "SPT pruning events after the start"),
}
#: The ``Recipe`` fields that are flags as they are: flag -> (type, or the choices, and help).
FIELD_FLAGS = {
    "--pruner": (PRUNERS, "one-shot pruner"),
    "--allocation": (ALLOCATIONS, "uniform: every layer at the target sparsity; owl: outlier-weighted layer "
                                  "sparsities with the same global count (unstructured targets)"),
    "--lr": (float, "AdamW learning rate (cosine schedule, no warm-up)"),
    "--steps": (int, "training steps"),
    "--batch-size": (int, "training windows per step"),
    "--seq-len": (int, "tokens per training window"),
    "--loss": (LOSSES, "squarehead: CE + lambda x SquareHead distillation from the dense teacher"),
    "--squarehead-lambda": (float, "with --loss squarehead: the weight of the hidden-state term"),
    "--logit-lambda": (float, "with --loss squarehead: + this weight x KL(teacher || student) of the next-token "
                              "distributions; 0 = off"),
    "--calib-samples": (int, "calibration windows"),
    "--calib-seq-len": (int, "tokens per calibration window"),
    "--seed": (int, "draws the calibration and training windows, seeds the adapter's initialisation"),
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_recipe_flags(parser, defaults: dict | None = None, reconstruct: bool = True) -> None:
    """Add a ``Recipe``'s flags to an argparse ``parser``: ``--method`` (one of ``METHODS``, or ``none``:
    no fine-tuning) and its options (``METHOD_FLAGS``), the fields of ``FIELD_FLAGS``, ``--induce`` /
    ``--no-induce`` with ``--induce-alpha``, ``--tune-dense`` / ``--no-tune-dense`` with
    ``--tune-dense-steps``, ``--tune-dense-lr``, ``--tune-dense-r``, and with ``reconstruct`` ``--reconstruct`` /
    ``--no-reconstruct`` with ``--reconstruct-epochs``, ``--reconstruct-lr``, ``--reconstruct-batch-size``.
    ``defaults``: a default per flag destination (e.g. ``{"method": "spp", "r": 8}``); the others
    default to None, which ``recipe_from_flags`` reads as "as the base recipe has it"."""
    import argparse

    defaults = defaults or {}

    def add(flag, kind, help_text):
        choices = kind if isinstance(kind, tuple) else None
        parser.add_argument(flag, type=None if choices else kind, choices=choices, default=defaults.get(_dest(flag)),
                            help=help_text)

    add("--method", (*METHODS, "none"), "the PEFT method (none: no fine-tuning)")
    for flag, (kind, help_text) in FIELD_FLAGS.items():
        add(flag, kind, help_text)
    for flag, (_, _, kind, help_text) in METHOD_FLAGS.items():
        add(flag, kind, help_text)
    parser.add_argument("--induce", action=argparse.BooleanOptionalAction, default=defaults.get("induce"),
                        help="Sparsity Induction (sp.induce_sparsity) on the calibration batches before pruning")
    add("--induce-alpha", float, "induce_sparsity's alpha")
    if reconstruct:
        parser.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=defaults.get("reconstruct"),
                            help="block-wise reconstruction (sp.reconstruct) between pruning and fine-tuning")
        for option, kind in zip(RECONSTRUCT_OPTIONS, (int, float, int)):
            add(f"--reconstruct-{option.replace('_', '-')}", kind, f"sp.reconstruct's {option}")
    parser.add_argument("--tune-dense", action=argparse.BooleanOptionalAction, default=defaults.get("tune_dense"),
                        help="plain LoRA on the dense model, first windows of the budget, merged before pruning")
    for option, kind, help_text in zip(TUNE_DENSE_OPTIONS, (int, float, int), (
            "its share of --steps (default half)", "its learning rate (default --lr)", "its LoRA rank (default 8)")):
        add(f"--tune-dense-{option}", kind, f"with --tune-dense: {help_text}")


def recipe_from_flags(args, base: Recipe) -> Recipe:
    """``base`` with what the flags of ``add_recipe_flags`` set (each not None): the fields, the method
    (a method other than the base's starts from no options) and its options, induction and its alpha,
    the dense tuning and the reconstruction, each with its options. Raises ValueError for a value
    ``Recipe`` refuses."""
    fields = {_dest(flag): getattr(args, _dest(flag)) for flag in FIELD_FLAGS if getattr(args, _dest(flag)) is not None}
    method = base.method if args.method is None else None if args.method == "none" else args.method
    options = dict(base.method_options) if method == base.method else {}
    options.update({field: getattr(args, _dest(flag)) for flag, (methods, field, *_) in METHOD_FLAGS.items()
                    if method in methods and getattr(args, _dest(flag)) is not None})

    def stage(name, enabled, given: dict):
        current = getattr(base, name) if enabled is None else enabled
        if not current or not given:
            return current
        return {**(current if isinstance(current, dict) else {}), **given}

    induce = stage("induce", args.induce, {} if args.induce_alpha is None else {"alpha": args.induce_alpha})
    given = {option: getattr(args, f"reconstruct_{option}", None) for option in RECONSTRUCT_OPTIONS}
    reconstruct = stage("reconstruct", getattr(args, "reconstruct", None),
                        {option: value for option, value in given.items() if value is not None})
    given = {option: getattr(args, f"tune_dense_{option}", None) for option in TUNE_DENSE_OPTIONS}
    tune_dense = stage("tune_dense", getattr(args, "tune_dense", None),
                       {option: value for option, value in given.items() if value is not None})
    return dataclasses.replace(base, **fields, method=method, method_options=options, induce=induce,
                               reconstruct=reconstruct, tune_dense=tune_dense)


@dataclass
class Stage:
    """One stage ``sp.recover`` ran: its name, its settings and results, its wall time."""

    name: str
    settings: dict
    seconds: float


@dataclass
class RecoveryReport:
    """What ``sp.recover`` did: the target, the recipe, each stage (``stages``, in order, with its
    settings and seconds), the global sparsity after merging (``global_sparsity``; every layer was
    checked at the target) and whether every layer kept the mask pruning gave it
    (``mask_unchanged``; SEFT moves positions, keeping each layer's count). ``to_dict()`` is JSON-ready."""

    target: dict
    recipe: Recipe
    stages: list[Stage] = field(default_factory=list)
    global_sparsity: float = 0.0
    mask_unchanged: bool | None = None

    def to_dict(self) -> dict:
        return {"target": self.target, "recipe": self.recipe.to_dict(),
                "stages": [dataclasses.asdict(stage) for stage in self.stages],
                "global_sparsity": self.global_sparsity, "mask_unchanged": self.mask_unchanged}

    def to_markdown(self) -> str:
        lines = ["| stage | seconds | settings |", "| --- | ---: | --- |"]
        lines += [f"| {s.name} | {s.seconds:.1f} | " + ", ".join(f"{k}={v}" for k, v in s.settings.items()) + " |"
                  for s in self.stages]
        return "\n".join(lines)


# --- the stages ----------------------------------------------------------------------------------------

def calibration_windows(train_ids: torch.Tensor, recipe: Recipe) -> list[torch.Tensor]:
    """``recipe.calib_samples`` random windows of ``recipe.calib_seq_len`` tokens, drawn with ``recipe.seed``."""
    return random_windows(train_ids, n=recipe.calib_samples, seq_len=recipe.calib_seq_len, seed=recipe.seed)


def prune_stage(model: nn.Module, target: dict, recipe: Recipe, calibration, show_progress: bool = True,
                cache: str | Path | None = None):
    """``sp.prune`` with the recipe's pruner, allocation and induction, in place.

    ``cache``: a ``.safetensors`` path to reuse the pruned weights across runs (calibrated pruning of
    a 135M model takes minutes on a CPU). When the file exists the weights are read from it, else
    they are computed and written there (whole, through a rename). The caller names the file by
    everything that decides the weights: model, target, pruner, induction, calibration. The file
    holds every prunable linear's weight, and with induction the norm weights and biases it rescales.
    """
    from safetensors.torch import load_file, save_file

    def pruned_params() -> dict:
        induced = [(n, p) for n, p in model.named_parameters() if n.endswith(("norm.weight", ".bias"))]
        return {**{name: linear.weight for name, linear in named_linears(model)},
                **(dict(induced) if recipe.induce else {})}

    if cache is not None and Path(cache).exists():
        weights = load_file(str(cache))
        for name, param in pruned_params().items():
            param.data.copy_(weights[name])
        return
    prune(model, method=recipe.pruner, **target, calibration=calibration, induce=recipe.induce,
          allocation=recipe.allocation, show_progress=show_progress)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(cache).with_suffix(".partial")  # a run reading the same key never sees half a file
        save_file({name: param.detach().contiguous() for name, param in pruned_params().items()}, str(partial))
        partial.replace(cache)


def reconstruct_stage(model: nn.Module, dense_model: nn.Module, calibration, recipe: Recipe,
                      show_progress: bool = True):
    """``sp.reconstruct`` with the recipe's options (its defaults for those not given) and seed."""
    options = recipe.reconstruct if isinstance(recipe.reconstruct, dict) else {}
    return reconstruct(model, dense_model, calibration, **options, seed=recipe.seed, show_progress=show_progress)


def peft_config(recipe: Recipe, target: dict | None = None):
    """The method's peft config through ``sp.method_config``. SPT prunes while it trains: with the
    recipe's pruner, to ``target``, by its option ``prune_end_step`` (default: half the steps)."""
    options = dict(recipe.method_options)
    if recipe.method == "spt":
        target = target or {}
        options.update(target_sparsity=target.get("sparsity"), target_pattern=target.get("pattern"),
                       pruner=recipe.pruner,
                       prune_end_step=options.get("prune_end_step") or max(1, recipe.steps // 2))
    return method_config(recipe.method, **options)


def distillation_loss_fn(teacher: nn.Module | None, recipe: Recipe):
    """``loss_fn(model, batch, labels)`` for ``train``: CE on ``labels`` + SquareHead (+ the logit KL
    term, on every position) from the frozen ``teacher``; None for plain CE."""
    if recipe.loss != "squarehead":
        return None
    if teacher is None:
        raise ValueError("distillation_loss_fn: loss 'squarehead' needs a teacher (the model before pruning)")
    from .training.squarehead import SquareHeadLoss, distillation_loss, teacher_outputs

    squarehead = SquareHeadLoss()

    def loss_fn(student, batch, labels):
        outputs = student(input_ids=batch, labels=labels, output_hidden_states=True)
        teacher_out = teacher_outputs(teacher, {"input_ids": batch})
        return distillation_loss(outputs, teacher_out.hidden_states, teacher_out.logits,
                                 squarehead_lambda=recipe.squarehead_lambda, logit_lambda=recipe.logit_lambda,
                                 squarehead_loss=squarehead)[0]

    return loss_fn


def _step_hook(peft_model, recipe: Recipe, totals: dict, spt_calibration=None):
    """What runs after each optimizer step: SEFT's topology updates (counted in ``totals``), SPT's
    gradual pruning; None for the other methods."""
    if recipe.method == "seft":
        from .training.seft import seft_step, seft_summary

        totals.update(dict.fromkeys(SEFT_TOTALS, 0))

        def after_step(step, optimizer):
            for key, value in seft_summary(seft_step(peft_model, optimizer, step, total_steps=recipe.steps)).items():
                totals[key] += value

        seft_step(peft_model, None, 0, total_steps=recipe.steps)  # arm the first gradient window
        return after_step
    if recipe.method == "spt":
        from .tuners.spt import gradual_prune_step

        def after_step(step, optimizer):
            gradual_prune_step(peft_model, step, calibration=spt_calibration)

        after_step(0, None)  # the schedule's start (prunes only if initial_sparsity > 0)
        return after_step
    return None


def train(peft_model, batches, lr: float, show_progress: bool = True, after_step=None, loss_fn=None,
          label_batches=None) -> list[float]:
    """AdamW + cosine over ``batches``; ``after_step(step, optimizer)`` runs after each optimizer step
    (SEFT's topology updates, SPT's pruning); ``loss_fn(model, batch, labels)`` replaces plain CE
    (SquareHead). ``label_batches``: each batch's labels (``IGNORED_LABEL`` where no loss is taken);
    None: the batches themselves. Returns the step times."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    device = next(peft_model.parameters()).device
    step_times = []
    peft_model.train()
    bar = progress(batches, "training", show_progress)
    for step, batch in enumerate(bar):
        t0 = time.perf_counter()
        batch = batch.to(device)
        labels = batch if label_batches is None else label_batches[step].to(device)
        loss = loss_fn(peft_model, batch, labels) if loss_fn else peft_model(input_ids=batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(len(step_times) + 1, optimizer)
        step_times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    peft_model.eval()
    return step_times


@dataclass
class TrainingRun:
    """What ``fine_tune`` returns: the trained peft model (not merged), each step's seconds, the
    trainable parameter count, and SEFT's topology totals (``dropped``, ``grown``, ``regrown``,
    ``pruned``; empty for the other methods)."""

    peft_model: nn.Module
    step_times: list[float]
    trainable_params: int
    seft_totals: dict


def fine_tune(model: nn.Module, train_ids: torch.Tensor, recipe: Recipe, target: dict | None = None, *,
              teacher: nn.Module | None = None, spt_calibration=None, show_progress: bool = True,
              train_labels: torch.Tensor | None = None, windows: tuple[int, int] | None = None) -> TrainingRun:
    """Wrap ``model`` with the recipe's method and train it (``train``) on ``recipe.steps`` batches of
    random windows of ``train_ids``; ``train_labels`` (``train_ids`` with ``IGNORED_LABEL`` where no loss
    is taken, e.g. ``sp.data.placeholder_labels``): the same windows of it are the labels.
    ``teacher``: the frozen model SquareHead distils from. With ``recipe.tune_dense`` the method takes
    only the batches the dense tuning (``tune_dense_stage``) left: ``recipe.steps`` minus its share,
    from the same draw, so no window is seen twice. ``windows``: ``(first, total)``: of the ``total``
    batches the recipe's seed draws, train on ``recipe.steps`` from ``first`` on (what
    ``tune_dense_stage`` asks for); None: the recipe's own share, as above.
    ``target`` and ``spt_calibration`` (Wanda's batches per pruning event; None: running norms of the
    training batches) serve SPT's gradual pruning only."""
    from peft import get_peft_model

    if windows is None:  # the dense tuning's share comes first
        windows = (recipe.tune_dense_options().get("steps", 0), recipe.steps)
        recipe = dataclasses.replace(recipe, steps=windows[1] - windows[0], tune_dense=False)  # SEFT's, SPT's schedules
    first, total = windows
    if not 0 <= first <= total - recipe.steps:
        raise ValueError(f"fine_tune: windows {(first, total)} hold no {recipe.steps} batches from {first} on")
    peft_model = get_peft_model(model, peft_config(recipe, target))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    draw = dict(n=total, seq_len=recipe.seq_len, seed=recipe.seed + 1, batch_size=recipe.batch_size)
    part = slice(first, first + recipe.steps)
    batches = random_windows(train_ids, **draw)[part]  # the same length and seed: the same windows of the labels
    label_batches = None if train_labels is None else random_windows(train_labels, **draw)[part]
    totals: dict = {}
    after_step = _step_hook(peft_model, recipe, totals, spt_calibration)
    step_times = train(peft_model, batches, recipe.lr, show_progress, after_step=after_step,
                       loss_fn=distillation_loss_fn(teacher, recipe), label_batches=label_batches)
    return TrainingRun(peft_model, step_times, trainable, totals)


def merge(peft_model, method: str):
    """``(merged model, MergeReport or None)``: ``merge_and_unload()`` for the sparse methods; plain LoRA's
    own merge densifies, so it is merged then re-masked (``sp.merge_and_unload_sparse``, whose report
    says how much of the update the mask cut). SPT's prompts cannot merge: ValueError."""
    if method == "spt":
        raise ValueError("merge: SPT cannot be merged (its prompts are extra key/value positions, not a weight "
                         "change); evaluate the peft model, or unload() it for the pruned base alone")
    return merge_and_unload_sparse(peft_model) if method == "lora" else (peft_model.merge_and_unload(), None)


def tune_dense_stage(model: nn.Module, train_ids: torch.Tensor, recipe: Recipe, show_progress: bool = True,
                     train_labels: torch.Tensor | None = None) -> tuple[nn.Module, TrainingRun]:
    """``recipe.tune_dense``: plain LoRA (rank ``r``, CE, AdamW + cosine at its ``lr``) on the first
    ``steps`` of the recipe's training windows, merged into ``model`` with peft's own merge (the model
    is dense: nothing to keep). Returns ``(the merged model, its TrainingRun)``; ``fine_tune`` with the
    same recipe then trains the method on the windows left."""
    options = recipe.tune_dense_options()
    dense_recipe = dataclasses.replace(recipe, tune_dense=False, method="lora", method_options={"r": options["r"]},
                                       lr=options["lr"], steps=options["steps"], loss="ce", squarehead_lambda=1.0,
                                       logit_lambda=0.0)
    run = fine_tune(model, train_ids, dense_recipe, show_progress=show_progress, train_labels=train_labels,
                    windows=(0, recipe.steps))
    return run.peft_model.merge_and_unload(), run


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each prunable linear's mask (``W != 0``) by layer name."""
    return {name: linear.weight != 0 for name, linear in named_linears(model)}


def mask_changes(masks: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """How ``model``'s masks differ from ``masks`` (``masks_of`` an earlier state): every mask identical
    (``mask_identical``), every layer's count of nonzeros identical (``counts_identical``), the kept
    positions that are now zero (``positions_moved``), and the fraction of the zeros of ``masks`` that
    are still zero (``zeros_kept``)."""
    linears = dict(named_linears(model))
    zeros_kept = sum(int((~masks[name] & (lin.weight == 0)).sum()) for name, lin in linears.items())
    return {"mask_identical": all(torch.equal(lin.weight != 0, masks[name]) for name, lin in linears.items()),
            "counts_identical": all(int((lin.weight != 0).sum()) == int(masks[name].sum())
                                    for name, lin in linears.items()),
            "positions_moved": sum(int((masks[name] & (lin.weight == 0)).sum()) for name, lin in linears.items()),
            "zeros_kept": zeros_kept / max(1, sum(int((~mask).sum()) for mask in masks.values()))}


def zero_counts(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each layer's count of zeros in ``masks`` (``masks_of``): what an OWL allocation gave each layer."""
    return {name: int((~mask).sum()) for name, mask in masks.items()}


def layers_off_target(model: nn.Module, target: dict, allocated: dict[str, int] | None = None) -> list[str]:
    """The prunable layers not exactly at ``target``, each with what it has: at a sparsity, layer ``i``
    must hold ``round(sparsity * numel_i)`` zeros, or with ``allocated`` (``zero_counts`` after an OWL
    pruning) exactly its allocated count, the layers together ``round(sparsity * numel)`` (``"global"``
    in the list when not); at N:M, at most N nonzeros in every group of M."""
    off, zeros_total, numel_total = [], 0, 0
    for name, linear in named_linears(model):
        weight = linear_view(linear).weight  # out x in, the axis N:M groups run along
        if "pattern" in target:
            n, m = parse_pattern(target["pattern"])
            nonzeros = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
            if int(nonzeros.max()) > n:
                off.append(f"{name}: a group of {m} with {int(nonzeros.max())} nonzeros (pattern {n}:{m})")
            continue
        zeros = int((weight == 0).sum())
        zeros_total, numel_total = zeros_total + zeros, numel_total + weight.numel()
        expected = (unstructured_zero_count(target["sparsity"], weight.numel()) if allocated is None
                    else allocated.get(name))
        if zeros != expected:
            why = f"sparsity {target['sparsity']:g}" if allocated is None else "its OWL allocation"
            off.append(f"{name}: {zeros} zeros of {weight.numel()}, target {expected} ({why})")
    if allocated is not None and "sparsity" in target:
        expected = unstructured_zero_count(target["sparsity"], numel_total)
        if zeros_total != expected:
            off.append(f"global: {zeros_total} zeros of {numel_total}, target {expected} "
                       f"(sparsity {target['sparsity']:g})")
    return off


def check_sparsity(model: nn.Module, target: dict, allocated: dict[str, int] | None = None) -> None:
    """Raise RuntimeError naming the first layer not exactly at ``target`` (``layers_off_target``)."""
    off = layers_off_target(model, target, allocated)
    if off:
        raise RuntimeError(f"{len(off)} layers are not at the target after recovery, e.g. {off[0]}")


# --- the pipeline ----------------------------------------------------------------------------------------

def _target_of(sparsity, pattern) -> dict:
    if (sparsity is None) == (pattern is None):
        raise ValueError(f"recover: give exactly one of sparsity and pattern, got sparsity={sparsity!r}, "
                         f"pattern={pattern!r}")
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return {"pattern": f"{n}:{m}"}
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ValueError(f"recover: sparsity must be a number in (0, 1), got {sparsity!r}")
    return {"sparsity": float(sparsity)}


def _check_inputs(train_ids, recipe, target: dict, calibration, train_labels=None) -> bool:
    """``recover``'s refusals, before any weight changes; whether calibration windows must be drawn
    from ``train_ids``."""
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recover: recipe must be an sp.Recipe, got {type(recipe).__name__}")
    if recipe.method == "spt":
        raise ValueError("recover: recipe.method 'spt' cannot be merged (its prompts are extra key/value "
                         "positions, not a weight change); train SPT with sp.SPTConfig (docs/spt.md)")
    if not torch.is_tensor(train_ids) or train_ids.dim() != 1 or train_ids.is_floating_point():
        raise ValueError(f"recover: train_ids must be a 1-D tensor of token ids, got "
                         f"{tuple(train_ids.shape) if torch.is_tensor(train_ids) else type(train_ids).__name__}")
    if train_labels is not None and (not torch.is_tensor(train_labels) or train_labels.shape != train_ids.shape
                                     or train_labels.is_floating_point()):
        raise ValueError(f"recover: train_labels must be integer labels shaped like train_ids "
                         f"{tuple(train_ids.shape)}, got "
                         f"{tuple(train_labels.shape) if torch.is_tensor(train_labels) else type(train_labels).__name__}")
    if recipe.allocation != "uniform" and "pattern" in target:
        raise ValueError(f"recover: allocation {recipe.allocation!r} sets unstructured layer sparsities; it cannot "
                         f"be used with pattern {target['pattern']!r}")
    if recipe.method is not None:
        peft_config(recipe, target)  # an unknown or bad method option fails now, not after pruning
    needs_calibration = calibration is None and (recipe.pruner != "magnitude" or bool(recipe.induce)
                                                 or bool(recipe.reconstruct))
    longest = max([recipe.seq_len] * (recipe.method is not None) + [recipe.calib_seq_len] * needs_calibration,
                  default=0)
    if train_ids.numel() <= longest:
        raise ValueError(f"recover: train_ids has {train_ids.numel()} tokens, need more than {longest} "
                         "(the recipe's seq_len / calib_seq_len windows)")
    return needs_calibration


def recover(model: nn.Module, train_ids: torch.Tensor, *, sparsity: float | None = None, pattern: str | None = None,
            recipe: Recipe | None = None, calibration=None, teacher: nn.Module | None = None,
            show_progress: bool = True, train_labels: torch.Tensor | None = None):
    """Prune ``model`` to a target and win back its accuracy; return ``(merged model, RecoveryReport)``.

        merged, report = sp.recover(model, token_ids, sparsity=0.5)       # or pattern="2:4"
        print(report.to_markdown())

    Stages, each timed in the report: tune dense (``recipe.tune_dense``: plain LoRA, merged) -> copy
    the dense model (when a later stage needs it) -> prune (``recipe.pruner``, Sparsity Induction first
    when ``recipe.induce``) -> reconstruct (``sp.reconstruct`` against the dense copy) -> fine-tune
    (``recipe.method``: AdamW + cosine, CE or SquareHead) -> merge (``merge_and_unload()``; plain
    LoRA re-masked) -> check that every prunable layer is exactly at the target.

    Args:
        model: a transformers causal LM, dense (or pruned before: it is pruned again to the target),
            not peft-wrapped. Changed in place; the merged model returned is the same module tree.
        train_ids: 1-D LongTensor, one stream of token ids: the training windows and, without
            ``calibration``, the calibration windows are drawn from it.
        sparsity / pattern: the target, exactly one: a fraction in (0, 1) or ``"N:M"``.
        recipe: the stages and their settings; None: ``default_recipe(target)``, from
            ``DEFAULT_RECIPES`` (chosen on SmolLM2-135M; how each was chosen: its comment there).
        calibration: token batches for the pruner and the reconstruction (as ``sp.prune`` takes
            them); None: ``recipe.calib_samples`` windows of ``train_ids``.
        teacher: the frozen model SquareHead distils from; None: a copy of ``model`` taken before
            pruning (after ``recipe.tune_dense``, so the tuned dense model).
        train_labels: ``train_ids`` with ``IGNORED_LABEL`` (-100) where the fine-tuning takes no loss
            (``sp.data.placeholder_labels``: a placeholder's tokens); None: every token.
        show_progress: tqdm bars over the pruning, the reconstruction and the training steps.

    Cost: the pruner's pass over the calibration set, ``recipe.steps`` training steps (``tune_dense``'s
    share of them plain LoRA on the dense model), with ``reconstruct`` ``epochs`` passes per block.
    Memory: the reconstruction and SquareHead without ``teacher`` need a frozen dense copy of the model
    (taken before pruning, released after the reconstruction when SquareHead is not used); SquareHead
    also runs the teacher's forward each step. ``torch.manual_seed(recipe.seed)`` is called before the
    adapter is created (its initialisation), as transformers' ``Trainer`` seeds.

    Raises ValueError (before any weight changes) for: both or neither of sparsity / pattern, a
    sparsity outside (0, 1), a malformed pattern, ``recipe.method == "spt"`` (its prompts cannot be
    merged), ``train_ids`` not a 1-D integer tensor or not longer than the windows drawn from it,
    ``train_labels`` not integer or not shaped like it, ``recipe.allocation == "owl"`` with a pattern;
    the stages raise theirs (e.g. induction on a model that is not Llama-style). RuntimeError if a layer
    is not exactly at the target after merging (OWL: at its allocated count, all together at the target).
    """
    target = _target_of(sparsity, pattern)
    recipe = recipe if recipe is not None else default_recipe(target)
    needs_calibration = _check_inputs(train_ids, recipe, target, calibration, train_labels)
    report = RecoveryReport(target=target, recipe=recipe)

    def timed(name, run, **settings):
        start = time.perf_counter()
        result = run()
        report.stages.append(Stage(name, settings, round(time.perf_counter() - start, 3)))
        return result

    needs_teacher = recipe.method is not None and recipe.loss == "squarehead" and teacher is None
    tuned = recipe.tune_dense_options().get("steps", 0)  # the windows the dense tuning takes from the budget
    if tuned:
        model, run = timed("tune dense", lambda: tune_dense_stage(model, train_ids, recipe, show_progress,
                                                                 train_labels), **recipe.tune_dense_options())
        report.stages[-1].settings["trainable_params"] = run.trainable_params
    dense = None
    if recipe.reconstruct or needs_teacher:
        dense = timed("copy dense model", lambda: copy.deepcopy(model).eval().requires_grad_(False),
                      parameters=sum(p.numel() for p in model.parameters()))
    calibration = calibration_windows(train_ids, recipe) if needs_calibration else (
        None if calibration is None else list(calibration))  # a list: the reconstruction reads it again
    timed("prune", lambda: prune_stage(model, target, recipe, calibration, show_progress),
          pruner=recipe.pruner, **target, allocation=recipe.allocation, induce=recipe.induce,
          calibration_batches=len(calibration) if calibration is not None else 0)
    if recipe.reconstruct:
        result = timed("reconstruct", lambda: reconstruct_stage(model, dense, calibration, recipe, show_progress),
                       **(recipe.reconstruct if isinstance(recipe.reconstruct, dict) else {}))
        blocks = max(1, len(result.blocks))
        report.stages[-1].settings.update(
            mean_error_before=float(f"{sum(b.error_before for b in result.blocks) / blocks:.4g}"),
            mean_error_after=float(f"{sum(b.final_error for b in result.blocks) / blocks:.4g}"))
    if not needs_teacher:
        dense = None  # the copy served the reconstruction only
    masks, merged = masks_of(model), model
    allocated = zero_counts(masks) if recipe.allocation != "uniform" else None  # OWL: each layer's own count
    if recipe.method is not None:
        torch.manual_seed(recipe.seed)
        teacher = dense if teacher is None else teacher
        run = timed("fine-tune", lambda: fine_tune(model, train_ids, recipe, target, teacher=teacher,
                                                    show_progress=show_progress, train_labels=train_labels),
                    method=recipe.method, **recipe.method_options, lr=recipe.lr, steps=recipe.steps - tuned,
                    batch_size=recipe.batch_size, seq_len=recipe.seq_len, loss=recipe.loss,
                    **({"squarehead_lambda": recipe.squarehead_lambda, "logit_lambda": recipe.logit_lambda}
                       if recipe.loss == "squarehead" else {}),
                    **({"ignored_label_tokens": int((train_labels == IGNORED_LABEL).sum())}
                       if train_labels is not None else {}))
        report.stages[-1].settings["trainable_params"] = run.trainable_params
        teacher = dense = None
        merged, _ = timed("merge", lambda: merge(run.peft_model, recipe.method),
                          how="merge_and_unload_sparse (re-masked)" if recipe.method == "lora" else "merge_and_unload")
    timed("check", lambda: check_sparsity(merged, target, allocated), layers=len(masks))
    report.global_sparsity = sparsity_report(merged).global_sparsity
    report.mask_unchanged = mask_changes(masks, merged)["mask_identical"]
    return merged, report
