"""Masked LoRA and SPP on bitsandbytes-quantized bases (Linear4bit nf4/fp4, Linear8bitLt), on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[quantized]')")

import sparse_peft as sp  # noqa: E402
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from sparse_peft.delta_linear import MaskedLowRankUpdate, delta_linear  # noqa: E402
from sparse_peft.quantized import dequantized_weight, is_quantized_linear  # noqa: E402

from conftest import TokenDataset, pruned_tiny_model  # noqa: E402

IDS = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))


def quantize_linears(model: nn.Module, kind: str, double_quant: bool = True) -> nn.Module:
    """Swap each pruned linear (not the head) for a bitsandbytes layer holding its weight, quantized
    on the CPU: what docs/quantized.md shows for quantizing in memory after pruning. ``double_quant``:
    4-bit block scales quantized again (bitsandbytes' default here; transformers' default is not)."""
    for name, linear in list(sp.sparsity.named_linears(model)):
        bias = linear.bias is not None
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                        has_fp16_weights=False, threshold=0.0)
            layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                      compute_dtype=torch.float32, quant_type=kind, compress_statistics=double_quant)
            layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=kind,
                                             compress_statistics=double_quant)
        if bias:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(linear.weight.device))  # .to quantizes
    return model


def quantized_tiny(kind: str = "nf4", seed: int = 0, sparsity: float = 0.5, double_quant: bool = True,
                   hidden: int = 64) -> nn.Module:
    return quantize_linears(pruned_tiny_model("llama", sparsity=sparsity, seed=seed, hidden=hidden), kind,
                            double_quant)


def repack_for_cpu_inference(model: nn.Module) -> None:
    """Repack every 4-bit weight for bitsandbytes' CPU inference kernel, as its inference forward does
    on a CPU with AVX512-BF16 (done here directly, so the tests cover it on any CPU)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not getattr(module.weight.quant_state,
                                                                  "packing_format_for_cpu", False):
            weight = module.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)


def quantized_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized layer's mask (dequantized weight != 0), by its name without peft's prefixes."""
    return {name.replace("base_model.model.", "").replace(".base_layer", ""): dequantized_weight(m) != 0
            for name, m in model.named_modules() if is_quantized_linear(m)}


def train(model, steps: int = 6, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model):
    """Inference logits (eval mode: on a CPU with AVX512-BF16, bitsandbytes then repacks 4-bit weights)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def assert_pruned_zero(merged: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    layers = {name: m for name, m in merged.named_modules() if is_quantized_linear(m)}
    assert set(layers) == set(masks)
    for name, layer in layers.items():
        weight = dequantized_weight(layer)
        assert not bool(weight[~masks[name]].any()), f"{name}: a pruned weight is nonzero after the merge"


CONFIGS = {"masked_lora": lambda **kw: sp.MaskedLoraConfig(r=4, target_modules="all-linear", **kw),
           "spp": lambda **kw: sp.SPPConfig(r=4, target_modules="all-linear", **kw)}
LR = {"masked_lora": 1e-2, "spp": 5e-2}


@pytest.mark.parametrize("kind,method", [("nf4", "masked_lora"), ("nf4", "spp"), ("fp4", "masked_lora"),
                                         ("int8", "masked_lora"), ("int8", "spp")])
def test_trains_and_merges_into_quantized_layers(kind, method):
    model = quantized_tiny(kind)
    masks = quantized_masks(model)
    peft_model = get_peft_model(model, CONFIGS[method]())
    losses = train(peft_model, lr=LR[method])
    assert losses[-1] < losses[0] - 0.01, losses
    unmerged = logits(peft_model)
    with peft_model.disable_adapter():
        untrained = logits(peft_model)
    kept = {name: int(mask.sum()) for name, mask in masks.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = peft_model.merge_and_unload()
    assert_pruned_zero(merged, masks)
    # the merged layers are still quantized, and their masks lost only what re-quantization rounded to 0
    now = quantized_masks(merged)
    assert all(not bool((now[name] & ~masks[name]).any()) for name in masks)
    lost = sum(kept[name] - int(now[name].sum()) for name in masks)
    if lost:
        assert any(f"rounded {lost} of {sum(kept.values())} kept weights" in str(w.message) for w in caught)
    # the merged model keeps what training learnt, up to the re-quantization's rounding (large for
    # 4-bit on this tiny model: its logits move by about half as much as training moved them)
    error, learnt = (logits(merged) - unmerged).norm(), (untrained - unmerged).norm()
    assert error < learnt, (error, learnt)
    with torch.no_grad():
        merged_loss = merged(input_ids=IDS, labels=IDS).loss.item()
    assert merged_loss < losses[0] - 0.5 * (losses[0] - losses[-1]), (merged_loss, losses)


def test_merge_report_counts_rounded_weights():
    model = quantized_tiny("nf4")
    masks = quantized_masks(model)
    peft_model = get_peft_model(model, CONFIGS["masked_lora"]())
    train(peft_model, steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, report = sp.merge_and_unload_sparse(peft_model)
    assert_pruned_zero(merged, masks)
    assert report.mean_removed_fraction == 0.0  # masked LoRA's update is inside the mask
    after = quantized_masks(merged)
    assert set(report.rounded_to_zero) == set(masks)
    for name, mask in masks.items():
        assert report.rounded_to_zero[name] == int((mask & ~after[name]).sum())
    assert sum(report.rounded_to_zero.values()) > 0  # NF4 rounds some of this tiny model's weights to 0


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized") / "pruned"
    pruned_tiny_model("llama").save_pretrained(path)
    return path


def load_4bit(path) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def test_plain_lora_merge_is_remasked_on_a_quantized_base(pruned_dir):
    from peft import LoraConfig

    # peft dispatches its 4-bit LoRA layer for a model transformers loaded in 4-bit
    model = load_4bit(pruned_dir)
    masks = quantized_masks(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, report = sp.merge_and_unload_sparse(peft_model)
    assert_pruned_zero(merged, masks)
    assert report.mean_removed_fraction > 0.2  # plain LoRA's update was dense: the mask cut about half


@pytest.mark.parametrize("method", ["masked_lora", "spp"])
def test_unmerge_is_exact(method):
    model = quantized_tiny("nf4")
    peft_model = get_peft_model(model, CONFIGS[method]())
    train(peft_model, steps=2, lr=LR[method])
    before = logits(peft_model)  # an eval forward: bitsandbytes repacks 4-bit weights for its CPU kernel
    layers = {name: m for name, m in peft_model.named_modules() if is_quantized_linear(m)}
    weights = {name: dequantized_weight(m) for name, m in layers.items()}
    peft_model.merge_adapter()
    assert any(not torch.equal(dequantized_weight(m), weights[n]) for n, m in layers.items())
    peft_model.unmerge_adapter()
    for name, m in layers.items():
        assert torch.equal(dequantized_weight(m), weights[name]), name
    assert torch.equal(logits(peft_model), before)


@pytest.mark.parametrize("double_quant", [True, False])
def test_training_after_an_eval_forward_gets_the_same_gradients(double_quant):
    """After an inference forward on a CPU with AVX512-BF16, bitsandbytes runs a 4-bit layer through a
    kernel without autograd: the layers must go back to the differentiable one before training, with
    their block scales in block order (128 inputs: two blocks a row, so an order mix-up shows)."""
    grads = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)
        peft_model = get_peft_model(quantized_tiny("nf4", double_quant=double_quant, hidden=128),
                                    sp.MaskedLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if evaluate_first:
            logits(peft_model)
            repack_for_cpu_inference(peft_model)  # what that forward does on such a CPU
        peft_model.train()
        peft_model(input_ids=IDS, labels=IDS).loss.backward()
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        grads.append(layer.masked_lora_A["default"].grad.clone())
    # equal up to the bf16 scales the repacking rounded (without the fix the gradient through every
    # base layer is lost and this differs by far more)
    assert (grads[1] - grads[0]).norm() < 0.05 * grads[0].norm()


def merged_logits_after_training(evaluate_first: bool, double_quant: bool) -> dict[str, torch.Tensor]:
    """Train masked LoRA on a 4-bit model (128 inputs a layer: two blocks a row), optionally after an
    inference forward; the logits unmerged, merged into the 4-bit layers, merged into fp32 weights."""
    torch.manual_seed(0)
    peft_model = get_peft_model(quantized_tiny("nf4", double_quant=double_quant, hidden=128),
                                CONFIGS["masked_lora"]())
    if evaluate_first:  # as a benchmark measures the pruned model before training it
        logits(peft_model)
        repack_for_cpu_inference(peft_model)
    losses = train(peft_model, steps=3)
    assert losses[-1] < losses[0], losses
    out = dict(unmerged=logits(peft_model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the count of kept weights re-quantization rounded to 0
        peft_model.merge_adapter()
    out["merged_into_4bit"] = logits(peft_model)
    peft_model.unmerge_adapter()
    merged, _ = sp.merge_and_unload_dequantized(peft_model, torch.float32)
    out["merged_dequantized"] = logits(merged)
    return out


@pytest.mark.parametrize("double_quant", [True, False])
def test_an_inference_forward_before_training_changes_neither_training_nor_merges(double_quant):
    """An inference forward repacks 4-bit weights for the CPU kernel (CPUs with AVX512-BF16) and
    training unpacks them: the weights must come back as they were (up to the bf16 scales of the
    packing), so training, the adapter and both merges give what they give without that forward."""
    reference = merged_logits_after_training(evaluate_first=False, double_quant=double_quant)
    evaluated = merged_logits_after_training(evaluate_first=True, double_quant=double_quant)
    # bf16 scales move these logits by about 1% (2% with nested statistics, which bitsandbytes
    # re-quantizes when unpacking), and the re-quantization of a merge by a few % more; block
    # scales out of order move them by about 30%
    for key, tolerance in (("unmerged", 0.05), ("merged_dequantized", 0.05), ("merged_into_4bit", 0.1)):
        error = (evaluated[key] - reference[key]).abs().max()
        assert error < tolerance * reference[key].abs().max(), (key, error)
    # and each merge keeps what the adapter computes (the 4-bit one up to its re-quantization)
    for run in (reference, evaluated):
        assert (run["merged_dequantized"] - run["unmerged"]).abs().max() < 0.02 * run["unmerged"].abs().max()
        assert (run["merged_into_4bit"] - run["unmerged"]).abs().max() < 0.2 * run["unmerged"].abs().max()


@pytest.mark.parametrize("double_quant", [True, False])
def test_saving_after_an_inference_forward_keeps_the_model(double_quant, tmp_path):
    """bitsandbytes unpacks a repacked 4-bit layer when its state dict is read (peft's save_pretrained,
    a Trainer's checkpoint): the adapter layers must read and run the weight as before."""
    peft_model = get_peft_model(quantized_tiny("nf4", double_quant=double_quant, hidden=128),
                                CONFIGS["masked_lora"](init_lora_weights=False))
    before = logits(peft_model)
    layers = {name: m for name, m in peft_model.named_modules() if is_quantized_linear(m)}
    weights = {name: dequantized_weight(m).float() for name, m in layers.items()}
    repack_for_cpu_inference(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    for name, m in layers.items():
        error = (dequantized_weight(m).float() - weights[name]).abs().max()
        assert error < 0.01 * weights[name].abs().max(), (name, error)
    after = logits(peft_model)
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_eval_forward_keeps_the_mask():
    """An inference forward may repack a 4-bit weight in place (CPUs with AVX512-BF16): the mask read
    from it, and so the adapters' fingerprints, must not change."""
    model = quantized_tiny("nf4")
    peft_model = get_peft_model(model, CONFIGS["masked_lora"]())
    layers = [m for m in peft_model.modules() if isinstance(m, sp.tuners.masked_lora.layer.MaskedLoraLayer)]
    fingerprints = [sp.mask_fingerprint(layer.sparsity_mask) for layer in layers]
    logits(peft_model)
    assert all(torch.equal(sp.mask_fingerprint(layer.sparsity_mask), fp) for layer, fp in zip(layers, fingerprints))


@pytest.mark.parametrize("method", ["masked_lora", "spp"])
def test_merge_to_plain_dtype_keeps_the_exact_mask(method, tmp_path):
    model = quantized_tiny("nf4")
    masks = quantized_masks(model)
    peft_model = get_peft_model(model, CONFIGS[method]())
    train(peft_model, steps=3, lr=LR[method])
    unmerged = logits(peft_model)
    merged, _ = sp.merge_and_unload_dequantized(peft_model, torch.float32)
    assert not any(is_quantized_linear(m) for m in merged.modules())
    linears = dict(sp.sparsity.named_linears(merged))
    assert set(linears) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(linears[name].weight != 0, mask), name
    # no re-quantization: the merged model computes what the adapter did, up to the CPU kernel's bf16 scales
    assert (logits(merged) - unmerged).abs().max() < 0.02 * unmerged.abs().max()
    assert getattr(merged.config, "quantization_config", None) is None

    sp.save_sparse(merged, tmp_path / "sparse", show_progress=False)
    loaded = sp.load_sparse(tmp_path / "sparse", show_progress=False)
    for name, linear in sp.sparsity.named_linears(loaded):
        assert torch.equal(linear.weight, linears[name].weight), name
    sp.export_dense(merged, tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(is_quantized_linear(m) for m in dense.modules())
    for name, linear in sp.sparsity.named_linears(dense):
        assert torch.equal(linear.weight != 0, masks[name]), name


def test_merge_to_bf16_keeps_the_exact_mask():
    model = quantized_tiny("int8")
    masks = quantized_masks(model)
    peft_model = get_peft_model(model, CONFIGS["masked_lora"]())
    train(peft_model, steps=2)
    merged, _ = sp.merge_and_unload_dequantized(peft_model, torch.bfloat16)
    for name, linear in sp.sparsity.named_linears(merged):
        assert linear.weight.dtype == torch.bfloat16
        assert torch.equal(linear.weight != 0, masks[name]), name


def test_merge_to_bf16_of_a_model_transformers_loaded_in_4bit(pruned_dir):
    # transformers refuses ``.to(dtype)`` on a model it loaded quantized: the merge must drop that
    # record before casting
    model = load_4bit(pruned_dir)
    masks = quantized_masks(model)
    peft_model = get_peft_model(model, CONFIGS["masked_lora"]())
    train(peft_model, steps=2)
    merged, _ = sp.merge_and_unload_dequantized(peft_model, torch.bfloat16)
    assert not getattr(merged, "is_quantized", False)
    for name, linear in sp.sparsity.named_linears(merged):
        assert linear.weight.dtype == torch.bfloat16
        assert torch.equal(linear.weight != 0, masks[name]), name


def test_bitsandbytes_config_load_trains_with_trainer_and_gradient_checkpointing(pruned_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = load_4bit(pruned_dir)
    assert is_quantized_linear(model.model.layers[0].mlp.down_proj)
    masks = quantized_masks(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, CONFIGS["masked_lora"]())
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=peft_model, args=args, train_dataset=TokenDataset(n=8))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0], losses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft_model.merge_and_unload()
    assert_pruned_zero(merged, masks)


def test_adapter_refused_on_a_quantized_base_with_another_mask(tmp_path):
    peft_model = get_peft_model(quantized_tiny("nf4", seed=0), CONFIGS["masked_lora"]())
    train(peft_model, steps=1)
    peft_model.save_pretrained(tmp_path / "adapter")
    # the same adapter loads back onto the same quantized base
    PeftModel.from_pretrained(quantized_tiny("nf4", seed=0), tmp_path / "adapter")
    other = quantized_tiny("nf4", seed=0, sparsity=0.6)
    with pytest.raises(ValueError, match="does not fit this base model"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")


def test_sparsity_report_reads_the_dequantized_weights():
    pruned = pruned_tiny_model("llama")
    zeros = {name: int((linear.weight == 0).sum()) for name, linear in sp.sparsity.named_linears(pruned)}
    report = sp.sparsity_report(quantize_linears(pruned, "nf4"))
    masks = quantized_masks(pruned)
    assert set(report.layers) == set(zeros)
    for name, layer in report.layers.items():
        assert layer.zeros == int((~masks[name]).sum()) >= zeros[name]
        assert layer.shape == tuple(masks[name].shape)


def test_prune_refuses_a_quantized_model():
    model = quantized_tiny("nf4")
    with pytest.raises(ValueError, match=r"prune before quantizing") as error:
        sp.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    assert "'model.layers.0.self_attn.q_proj'" in str(error.value) and "Linear4bit" in str(error.value)


def test_seft_refuses_a_quantized_base():
    with pytest.raises(TypeError, match=r"SEFT does not support a bitsandbytes-quantized base.*"
                                        r"'model.layers.0.self_attn.q_proj' is a Linear4bit"):
        get_peft_model(quantized_tiny("nf4"), sp.SEFTConfig(density=0.01, target_modules="all-linear"))


def test_delta_linear_with_a_weight_function_matches_and_saves_no_weight():
    torch.manual_seed(0)
    weight = torch.randn(48, 32) * (torch.rand(48, 32) > 0.5)
    A = torch.randn(4, 32, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    update = MaskedLowRankUpdate(A, B, 1.0)

    grads, saved = [], []
    for source in (weight, lambda: weight.clone()):
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = delta_linear(x, source, None, update, with_base=False, block_elements=32 * 16)
        y.square().sum().backward()
        grads.append((y.detach(), x.grad, A.grad.clone(), B.grad.clone()))
        A.grad = B.grad = None
        saved.append(None)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with_tensor, with_function = saved[:saved.index(None)], saved[saved.index(None) + 1:-1]
    assert weight.numel() in with_tensor and weight.numel() not in with_function


def test_spt_refuses_a_quantized_model():
    with pytest.raises(TypeError, match=r"SPT does not support bitsandbytes-quantized layers "
                                        r"\('model.layers.0.self_attn.q_proj' is a Linear4bit\)"):
        get_peft_model(quantized_tiny("nf4"), sp.SPTConfig(base_prompt_length=4))


# --- sp.fit_to_4bit: the pruned weights put on the 4-bit grid before quantizing -----------------------

def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: linear.weight.detach().clone() for name, linear in sp.sparsity.named_linears(model)}


@pytest.mark.parametrize("kind,dtype", [("nf4", torch.float32), ("fp4", torch.float32), ("nf4", torch.bfloat16)])
def test_fit_to_4bit_keeps_the_mask_and_quantizes_bit_for_bit(kind, dtype):
    import copy

    from conftest import calibration_batches

    model = pruned_tiny_model("llama", sparsity=0.5, seed=1).to(dtype)
    pruned = float_weights(model)
    report = sp.fit_to_4bit(model, calibration_batches(n=4, seq_len=16), quant_type=kind, show_progress=False)
    fitted = float_weights(model)
    assert set(report.relative_error) == set(pruned) and all(0 < e < 1 for e in report.relative_error.values())
    for name, weight in fitted.items():
        assert weight.dtype == dtype and not torch.equal(weight, pruned[name]), name  # moved onto the grid
        assert not ((weight != 0) & (pruned[name] == 0)).any(), name  # every pruned weight still exactly 0
        assert int(((weight == 0) & (pruned[name] != 0)).sum()) == report.rounded_to_zero[name], name
    # Quantizing (plain block scales) finds the fitted scales and codes again: nothing is rounded.
    quantized = quantize_linears(copy.deepcopy(model), kind, double_quant=False)
    for name, module in quantized.named_modules():
        if is_quantized_linear(module):
            assert torch.equal(dequantized_weight(module).to(dtype), fitted[name]), name


def test_fit_to_4bit_loads_unchanged_through_bitsandbytes_config(tmp_path):
    from conftest import calibration_batches

    model = pruned_tiny_model("llama", sparsity=0.5, seed=2)
    sp.fit_to_4bit(model, calibration_batches(n=4, seq_len=16), show_progress=False)
    fitted = float_weights(model)
    model.save_pretrained(tmp_path)
    loaded = load_4bit(tmp_path)
    layers = {name: dequantized_weight(m) for name, m in loaded.named_modules() if is_quantized_linear(m)}
    assert layers.keys() == fitted.keys()
    assert all(torch.equal(layers[name], fitted[name]) for name in fitted)


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_to_4bit_lowers_the_error_of_quantizing_on_the_calibration_data(seed):
    import copy

    from conftest import calibration_batches

    calibration = calibration_batches(n=4, seq_len=16, seed=seed)
    pruned = pruned_tiny_model("llama", sparsity=0.5, seed=seed)
    with torch.no_grad():
        reference = torch.cat([pruned(input_ids=batch).logits for batch in calibration])

    def error(model):
        with torch.no_grad():
            out = torch.cat([model(input_ids=batch).logits for batch in calibration])
        return float((out - reference).square().sum() / reference.square().sum())

    fitted = copy.deepcopy(pruned)
    sp.fit_to_4bit(fitted, calibration, show_progress=False)
    assert error(quantize_linears(fitted, "nf4", False)) < error(quantize_linears(pruned, "nf4", False))


def test_fit_to_4bit_refuses_what_it_cannot_fit():
    from conftest import calibration_batches, make_tiny_model

    batches = calibration_batches()
    with pytest.raises(ValueError, match=r"quant_type='int8' is not one of \['fp4', 'nf4'\]"):
        sp.fit_to_4bit(pruned_tiny_model("llama"), batches, quant_type="int8")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' has in_features=64, not a multiple "
                                         r"of blocksize=48"):
        sp.fit_to_4bit(pruned_tiny_model("llama"), batches, blocksize=48)
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D"):
        sp.fit_to_4bit(make_tiny_model("gpt2"), batches)
    with pytest.raises(ValueError, match=r"sp.fit_to_4bit needs plain float weights.*'model.layers.0.self_attn.q_proj'"):
        sp.fit_to_4bit(quantized_tiny("nf4"), batches)
