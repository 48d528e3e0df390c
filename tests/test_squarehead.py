"""SquareHead distillation: the normalised per-layer MSE, padding excluded, with a Trainer."""

import copy

import pytest
import torch
from conftest import TokenDataset, make_tiny_model, pruned_tiny_model
from peft import get_peft_model

import sparse_peft as sp
from sparse_peft.training.squarehead import (
    SquareHeadLoss,
    SquareHeadTrainer,
    cache_teacher_hidden_states,
    logit_distillation_loss,
    teacher_hidden_states,
)


def hidden(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def test_zero_for_the_teacher_itself_positive_for_a_pruned_student():
    teacher = make_tiny_model("llama")
    student = pruned_tiny_model("llama", 0.5)
    loss = SquareHeadLoss()
    t = hidden(teacher, IDS)
    assert loss(t, t).item() == 0.0
    per_layer = loss.per_layer(hidden(student, IDS), t)
    assert per_layer.shape == (len(t) - 1,)  # every layer output, not the embeddings
    assert (per_layer > 0).all()


def test_normalised_by_teacher_energy():
    teacher, student = hidden(make_tiny_model("llama"), IDS), hidden(pruned_tiny_model("llama", 0.5), IDS)
    loss = SquareHeadLoss(eps=1e-12)  # eps aside, the loss does not see the activations' scale
    scaled = loss([h * 10 for h in student], [h * 10 for h in teacher])
    assert scaled.item() == pytest.approx(loss(student, teacher).item(), rel=1e-4)


def test_padding_excluded():
    teacher = make_tiny_model("llama")
    student = pruned_tiny_model("llama", 0.5)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding on the first row
    t, s = hidden(teacher, IDS, mask), hidden(student, IDS, mask)
    loss = SquareHeadLoss()
    base = loss(s, t, mask)
    garbage = [h.clone() for h in s]
    for h in garbage:
        h[0, :4] += 1000.0  # whatever sits at padded positions must not count
    assert loss(garbage, t, mask).item() == pytest.approx(base.item(), rel=1e-6)
    assert loss(garbage, t).item() > 10 * base.item()  # ...and it would without the mask


def test_shape_mismatch_is_refused():
    t = hidden(make_tiny_model("llama"), IDS)
    with pytest.raises(ValueError, match="same depth"):
        SquareHeadLoss()(t[:-1], t)
    with pytest.raises(ValueError, match="reduction"):
        SquareHeadLoss(reduction="max")


def _args(tmp_path, steps=8, lr=2e-2):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)


@pytest.mark.parametrize("config, lr", [(sp.MaskedLoraConfig(r=4), 5e-3), (sp.SPPConfig(r=4), 5e-2),
                                        (sp.SEFTConfig(density=0.05), 5e-3), (sp.SPTConfig(base_prompt_length=4), 5e-2)],
                         ids=["masked_lora", "spp", "seft", "spt"])
def test_trainer_distills_toward_the_teacher(tmp_path, config, lr):
    teacher = make_tiny_model("llama")
    data = TokenDataset()
    probe = torch.stack([data[i]["input_ids"] for i in range(8)])
    loss = SquareHeadLoss()
    teacher_before = [p.clone() for p in teacher.parameters()]
    distance = {}
    for lam in (0.0, 10.0):  # the same run with CE only and with the distillation term
        student = get_peft_model(pruned_tiny_model("llama", 0.5), copy.deepcopy(config))
        before = loss(hidden(student, probe), hidden(teacher, probe)).item()
        trainer = SquareHeadTrainer(model=student, args=_args(tmp_path, lr=lr), train_dataset=data,
                                    teacher_model=teacher, squarehead_lambda=lam)
        trainer.train()
        assert set(trainer.last_loss_parts) == {"ce", "squarehead", "logit_kd"}
        distance[lam] = loss(hidden(student, probe), hidden(teacher, probe)).item()
    assert distance[10.0] < before
    assert distance[10.0] < distance[0.0]
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), teacher_before))  # teacher frozen


def test_cached_teacher_matches_live_teacher(tmp_path):
    teacher = make_tiny_model("llama")
    data = TokenDataset(n=4)
    cached = cache_teacher_hidden_states(teacher, data, dtype=torch.float32, show_progress=False)
    item = cached[1]
    live = teacher_hidden_states(teacher, {"input_ids": item["input_ids"][None]})
    assert item["teacher_hidden_states"].shape == (len(live), 12, 64)
    assert torch.allclose(item["teacher_hidden_states"], torch.stack([h[0] for h in live]))

    student = get_peft_model(pruned_tiny_model("llama", 0.5), sp.MaskedLoraConfig(r=4))
    trainer = SquareHeadTrainer(model=student, args=_args(tmp_path, steps=2), train_dataset=cached,
                                squarehead_lambda=1.0)
    trainer.train()  # no teacher model at all: the cached states reach compute_loss
    assert trainer.last_loss_parts["squarehead"] > 0


def test_trainer_without_teacher_or_cache_refuses(tmp_path):
    student = get_peft_model(pruned_tiny_model("llama", 0.5), sp.MaskedLoraConfig(r=4))
    trainer = SquareHeadTrainer(model=student, args=_args(tmp_path, steps=1), train_dataset=TokenDataset(n=4))
    with pytest.raises(ValueError, match="teacher_model"):
        trainer.train()


def test_logit_distillation_is_the_forward_kl_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert logit_distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    # KL(teacher || student) per token, as torch computes it, averaged over tokens
    reference = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                           log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(logit_distillation_loss(student, teacher), reference)
    assert logit_distillation_loss(student, teacher).item() != pytest.approx(
        logit_distillation_loss(teacher, student).item(), rel=1e-3)  # direction matters: teacher first
    # padding excluded: garbage at masked positions changes nothing
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    garbage = student.clone()
    garbage[1, :2] = 100.0
    torch.testing.assert_close(logit_distillation_loss(garbage, teacher, mask),
                               logit_distillation_loss(student, teacher, mask))
    # temperature: T² · KL of the softened distributions
    soft = torch.nn.functional.kl_div(torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1),
                                      log_target=True, reduction="none").sum(-1).mean() * 4
    torch.testing.assert_close(logit_distillation_loss(student, teacher, temperature=2.0), soft)
    with pytest.raises(ValueError, match="vocabulary"):
        logit_distillation_loss(student, teacher[..., :7])
    with pytest.raises(ValueError, match="temperature"):
        logit_distillation_loss(student, teacher, temperature=0.0)


def test_trainer_logit_term_pulls_the_student_distribution_toward_the_teacher(tmp_path):
    teacher = make_tiny_model("llama", seed=1)
    with torch.no_grad():  # a peaked teacher, far from the student: random tiny models are near uniform
        teacher.lm_head.weight.mul_(20.0)
    data = TokenDataset()
    probe = torch.stack([data[i]["input_ids"] for i in range(8)])

    def kl_to_teacher(model):
        with torch.no_grad():
            return logit_distillation_loss(model(input_ids=probe).logits, teacher(input_ids=probe).logits).item()

    measured = {}
    for lam in (0.0, 10.0):  # SquareHead off; the same run without and with the logit term
        student = get_peft_model(pruned_tiny_model("llama", 0.5), sp.MaskedLoraConfig(r=4))
        before = kl_to_teacher(student)
        trainer = SquareHeadTrainer(model=student, args=_args(tmp_path, lr=3e-2), train_dataset=data,
                                    teacher_model=teacher, squarehead_lambda=0.0, logit_lambda=lam)
        trainer.train()
        assert (trainer.last_loss_parts["logit_kd"] > 0) == (lam > 0)
        assert trainer.last_loss_parts["squarehead"] == 0.0
        measured[lam] = kl_to_teacher(student)
    assert measured[10.0] < before and measured[10.0] < measured[0.0]
    with pytest.raises(ValueError, match="teacher_model"):  # the logits are not cached: refused up front
        SquareHeadTrainer(model=student, args=_args(tmp_path), train_dataset=data, logit_lambda=1.0)
