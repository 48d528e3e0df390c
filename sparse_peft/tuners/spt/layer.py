"""The SPT layer: a decoder layer's self-attention plus gated attention to that layer's prompts.

For hidden states ``h`` (B x T x hidden) entering the attention of layer ``l`` with prompts ``P``
(p_l x hidden):

    q      = RoPE(h W_qᵀ + b_q)                    the layer's own queries, rotated as the base rotates them
    K_P    = P W_kᵀ + b_k,  V_P = P W_vᵀ + b_v      the layer's own (sparse) k/v projections, no RoPE
    A      = softmax(q K_Pᵀ · scaling)              over the p_l prompts only: no causal mask, no padding mask
    out    = W_o (attn(h) + g ⊙ A V_P) + b_o        g: one gate per query head, 0 at the start

Prompt keys without RoPE are keys at rotary position 0 (the rotation there is the identity), so a
query at position m sees the prompts at relative distance m, the same for every sequence of a
batch once left padding starts the positions at 0 (as ``generate`` does). The prompt path needs
only the current tokens' queries, so with a KV cache each decoding step adds the prompt attention
for its own token without recomputing anything of the prefix.

``attn(h)`` is the base attention's output before its ``o_proj``. The wrapper computes no projection
of ``h`` itself: during the base's forward it reads the queries ``q_proj`` returns and adds the
prompt context to the input of ``o_proj`` (forward hooks, present only during that call). So a
step costs the base's GEMMs plus the prompts' own small ones, and the statistics hooks of gradual
Wanda see ``o_proj``'s whole input, prompt context included.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..._distributed import full_tensor
from ...sparsity.masks import mask_fingerprint
from .._shared import FingerprintDict, adapter_dtype

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

MERGE_REFUSAL = (
    "SPT cannot merge: its prompts are extra key/value positions of every attention layer, not a change of any "
    "weight, so there is nothing to fold into the (sparse) weights and merge_and_unload() would silently drop "
    "what was trained. Keep the PeftModel (save_pretrained / PeftModel.from_pretrained) for inference, or call "
    "unload() to get the untouched sparse base model without the prompts."
)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B x heads x T x head_dim) as Llama / Qwen2 / Mistral rotate their queries."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class SPTLayer(BaseTunerLayer):
    adapter_layer_names = ("spt_prompt", "spt_gate")
    # spt_fingerprint (masks of q/k/v/o) is saved with the adapter: prompts trained on one pruned
    # model are refused on a base with other masks.
    other_param_names = ("prompt_length", "spt_fingerprint")

    def __init__(self, base_layer: nn.Module, layer_index: int, **kwargs) -> None:
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.prompt_length = {}
        self.spt_prompt = nn.ParameterDict({})
        self.spt_gate = nn.ParameterDict({})
        self.spt_fingerprint = FingerprintDict(self.check_fingerprint)
        self._disable_adapters = False
        self.merged_adapters = []
        projections = [getattr(base_layer, name, None) for name in ATTENTION_PROJECTIONS]
        if not all(isinstance(p, nn.Linear) for p in projections):
            found = {name: type(p).__name__ for name, p in zip(ATTENTION_PROJECTIONS, projections)}
            raise TypeError(f"SPT needs an attention module with nn.Linear q_proj/k_proj/v_proj/o_proj, got {found}")
        q_proj, k_proj = projections[0], projections[1]
        self.head_dim = int(base_layer.head_dim)
        self.hidden_size = q_proj.in_features
        self.num_heads = q_proj.out_features // self.head_dim
        self.num_kv_heads = k_proj.out_features // self.head_dim
        self.scaling = float(base_layer.scaling)
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, prompt_length: int, init_std: float = 1.0,
                     inference_mode: bool = False) -> None:
        if prompt_length < 1:
            raise ValueError(f"SPT layer {self.layer_index}: prompt length must be >= 1, got {prompt_length!r}")
        device = self.base_layer.q_proj.weight.device
        dtype = adapter_dtype(self.base_layer.q_proj.weight)
        self.prompt_length[adapter_name] = int(prompt_length)
        # Drawn in fp32; get_peft_model keeps the prompts and gates in fp32 on a bf16/fp16 base unless
        # asked not to (the gate's first updates are tiny).
        prompt = torch.randn(prompt_length, self.hidden_size, dtype=torch.float32, device=device) * init_std
        self.spt_prompt[adapter_name] = nn.Parameter(prompt.to(dtype))
        self.spt_gate[adapter_name] = nn.Parameter(torch.zeros(self.num_heads, dtype=dtype, device=device))
        self.refresh_fingerprint(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def resize_prompt(self, adapter_name: str, prompt_length: int, init_std: float = 1.0) -> bool:
        """Give ``adapter_name`` ``prompt_length`` prompt vectors, keeping the first ones it has.

        Returns True if the length changed (the parameter is then a new tensor: rebuild the optimizer).
        """
        old = self.spt_prompt[adapter_name]
        if prompt_length == old.shape[0]:
            return False
        if prompt_length < 1:
            raise ValueError(f"SPT layer {self.layer_index}: prompt length must be >= 1, got {prompt_length!r}")
        new = torch.randn(prompt_length, self.hidden_size, dtype=old.dtype, device=old.device) * init_std
        keep = min(prompt_length, old.shape[0])
        new[:keep] = old.detach()[:keep]
        self.spt_prompt[adapter_name] = nn.Parameter(new, requires_grad=old.requires_grad)
        self.prompt_length[adapter_name] = int(prompt_length)
        return True

    def attention_masks(self) -> list[torch.Tensor]:
        # Under FSDP the weights are shards between steps: the masks are gathered (transient).
        return [full_tensor(getattr(self.base_layer, name).weight.detach() != 0) for name in ATTENTION_PROJECTIONS]

    def current_fingerprint(self) -> torch.Tensor:
        """The fingerprints of the q/k/v/o masks as they are now (4 x 3, int64, CPU)."""
        return torch.stack([mask_fingerprint(m) for m in self.attention_masks()])

    def refresh_fingerprint(self, adapter_name: Optional[str] = None) -> None:
        """Record the current masks of q/k/v/o (after creation and after every pruning step)."""
        fingerprint = self.current_fingerprint().to(self.base_layer.q_proj.weight.device)
        for name in [adapter_name] if adapter_name else list(self.spt_fingerprint.keys()):
            self.spt_fingerprint[name] = fingerprint.clone()

    def check_fingerprint(self, adapter_name: str, saved: torch.Tensor) -> None:
        """Refuse loaded prompts whose saved q/k/v/o fingerprints are not this base's."""
        actual = self.current_fingerprint()
        if not torch.equal(saved.to(torch.int64).cpu(), actual):
            raise ValueError(
                f"SPT adapter {adapter_name!r} does not fit this base model at decoder layer {self.layer_index}: "
                f"its prompts were trained on attention projections with {saved[:, 1].tolist()} nonzeros "
                f"(q/k/v/o), this base has {actual[:, 1].tolist()} (or the same counts at other positions). "
                "Load it onto the pruned model it was trained with; to resume a Trainer checkpoint "
                "saved during gradual pruning, call sp.load_pruning_state(peft_model, checkpoint) first.")

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        return None  # nothing is ever merged

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


class SPTAttention(nn.Module, SPTLayer):
    """Wraps a Llama / Qwen2 / Mistral attention module (transformers 5 signature)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, layer_index: int, prompt_length: int,
                 init_std: float = 1.0, **kwargs) -> None:
        super().__init__()
        SPTLayer.__init__(self, base_layer, layer_index, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, prompt_length, init_std)

    def rotate_queries(self, projected: torch.Tensor, position_embeddings) -> torch.Tensor:
        """q_proj's output (B x T x heads*head_dim) rotated as the base rotates its queries (B x heads x T x head_dim)."""
        batch, length = projected.shape[:2]
        query = projected.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        if cos.shape[-1] != self.head_dim:
            raise ValueError(f"SPT layer {self.layer_index}: rotary embeddings of size {cos.shape[-1]} do not cover "
                             f"head_dim={self.head_dim} (partial rotary is not supported)")
        return apply_rope(query, cos.to(query.dtype), sin.to(query.dtype))

    def prompt_context(self, adapter_name: str, query: torch.Tensor) -> torch.Tensor:
        """``g ⊙ softmax(q K_Pᵀ · scaling) V_P``, laid out as o_proj's input (B x T x heads*head_dim)."""
        attn = self.base_layer
        k_proj, v_proj = attn.k_proj, attn.v_proj
        prompt = self.spt_prompt[adapter_name]
        length = prompt.shape[0]
        # The projections run in the base dtype (their weights'); scores and softmax in fp32.
        prompt_in = prompt.to(k_proj.weight.dtype)
        key = F.linear(prompt_in, k_proj.weight, k_proj.bias).view(length, self.num_kv_heads, self.head_dim)
        value = F.linear(prompt_in, v_proj.weight, v_proj.bias).view(length, self.num_kv_heads, self.head_dim)
        batch, _, tokens, _ = query.shape
        groups = self.num_heads // self.num_kv_heads  # GQA: consecutive query heads share one kv head
        query = query.reshape(batch, self.num_kv_heads, groups, tokens, self.head_dim).float()
        scores = torch.einsum("bkgtd,pkd->bkgtp", query, key.float()) * self.scaling
        probs = scores.softmax(dim=-1)
        mixed = torch.einsum("bkgtp,pkd->bkgtd", probs, value.float())
        gate = self.spt_gate[adapter_name].float().view(1, self.num_kv_heads, groups, 1, 1)
        mixed = (mixed * gate).reshape(batch, self.num_heads, tokens, self.head_dim)
        return mixed.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)

    def forward(self, *args, **kwargs):
        active = [] if self.disable_adapters else [name for name in self.active_adapters if name in self.spt_prompt]
        if not active:
            return self.base_layer(*args, **kwargs)
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None and len(args) > 1:
            position_embeddings = args[1]
        if position_embeddings is None:
            raise ValueError(f"SPT layer {self.layer_index}: the attention was called without position_embeddings "
                             "(cos, sin); SPT needs them to rotate its queries as the base does")
        # The prompt path rides on the base's own two projections instead of repeating them: it reads
        # the queries q_proj computes, and adds its context to o_proj's input (o_proj is linear, so
        # W_o(a + d) = W_o a + W_o d, its bias once). Computing them apart would cost two more GEMMs of
        # the attention's size in the forward and two in the backward, about 12% of a Llama step.
        seen = {}

        def keep_queries(module, inputs, output):
            seen["queries"] = output

        def add_prompt_context(module, inputs):
            if "queries" not in seen:
                raise RuntimeError(f"SPT layer {self.layer_index}: the attention called o_proj before q_proj; SPT "
                                   "needs the queries first (see SUPPORTED_MODEL_TYPES)")
            query = self.rotate_queries(seen.pop("queries"), position_embeddings)
            context = sum(self.prompt_context(name, query) for name in active)
            seen["added"] = True
            return (inputs[0] + context.to(inputs[0].dtype), *inputs[1:])

        handles = [self.base_layer.q_proj.register_forward_hook(keep_queries),
                   self.base_layer.o_proj.register_forward_pre_hook(add_prompt_context)]
        try:
            output = self.base_layer(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if "added" not in seen:
            raise RuntimeError(f"SPT layer {self.layer_index}: the attention never called o_proj after q_proj, so "
                               "its prompts were not applied (see SUPPORTED_MODEL_TYPES)")
        return output

    def __repr__(self) -> str:
        lengths = ", ".join(f"{k}: {v}" for k, v in self.prompt_length.items())
        return f"spt.SPTAttention(layer={self.layer_index}, prompt_length={{{lengths}}})\n  ({self.base_layer!r})"
