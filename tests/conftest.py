"""Tiny random models of several architectures, built in code (no network)."""

from __future__ import annotations

import os

# Triton fixes at decoration time whether @triton.jit code (its own tl.sum/tl.cumsum included) runs
# in its CPU interpreter, and importing sparse_peft/peft already imports triton through torch._dynamo.
# So the switch must be set before any test module is imported, for tests/test_kernels.py to run the
# kernels on the CPU. No other test touches Triton. An explicit TRITON_INTERPRET=0 is respected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are quiet in tests
# Tiny models: one thread is faster than two fighting over scheduling (and over a busy machine).
torch.set_num_threads(1)

ARCHS = ["llama", "qwen2", "mistral", "gpt_neox", "opt"]
# A fixed batch of token ids for comparing logits.
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def make_tiny_model(arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128):
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=128)
    if arch == "llama":
        config = LlamaConfig(**common, intermediate_size=2 * hidden, num_key_value_heads=2)
    elif arch == "qwen2":
        config = Qwen2Config(**common, intermediate_size=2 * hidden, num_key_value_heads=2)
    elif arch == "mistral":
        config = MistralConfig(**common, intermediate_size=2 * hidden, num_key_value_heads=2)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(**common, intermediate_size=4 * hidden)
    elif arch == "opt":
        config = OPTConfig(**common, ffn_dim=4 * hidden, word_embed_proj_dim=hidden)
    elif arch == "gpt2":
        # Linears are transformers' Conv1D (weight stored in x out). No dropout: a training run is
        # the same computation as the eval forwards it is compared with.
        config = GPT2Config(**common, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


def calibration_batches(vocab: int = 128, n: int = 4, seq_len: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seq_len), generator=g) for _ in range(n)]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tiny_model():
    return make_tiny_model


def pruned_tiny_model(arch: str = "llama", sparsity: float = 0.5, seed: int = 0, **kw):
    """A tiny model whose linears (not the head) are magnitude-pruned to ``sparsity`` per row."""
    import sparse_peft as sp

    model = make_tiny_model(arch, seed=seed, **kw)
    sp.prune(model, method="magnitude", sparsity=sparsity, show_progress=False)
    return model


def linear_masks(model):
    import sparse_peft as sp

    return {name: (mod.weight != 0).clone() for name, mod in sp.sparsity.named_linears(model)}


def assert_masks_equal(model, masks):
    import sparse_peft as sp

    seen = dict(sp.sparsity.named_linears(model))
    assert set(seen) == set(masks), "layer names changed"
    for name, mask in masks.items():
        got = seen[name].weight != 0
        assert torch.equal(got, mask), f"{name}: mask changed ({int((got != mask).sum())} positions differ)"


def train_steps(model, steps: int = 3, lr: float = 1e-2, vocab: int = 128, seed: int = 0):
    """A few AdamW steps of next-token loss on random tokens (enough to move every adapter)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing is trainable"
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()


def norm_rel_err(a, b):
    """``‖a - b‖ / ‖b‖`` (Frobenius). For trained values compared across process counts: Adam divides
    each gradient by its own running scale, so float noise in an element whose gradient is near zero
    moves that element by up to the learning rate; the norm over a tensor measures what training did."""
    return ((a - b).float().norm() / b.float().norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


class TokenDataset(torch.utils.data.Dataset):
    """``n`` random token windows as Trainer items (labels = inputs), optionally with an all-ones mask."""

    def __init__(self, n: int = 16, seq_len: int = 12, seed: int = 0, vocab: int = 128,
                 with_attention_mask: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=g)
        self.with_attention_mask = with_attention_mask

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "labels": self.ids[i]}
        if self.with_attention_mask:
            item["attention_mask"] = torch.ones_like(self.ids[i])
        return item
