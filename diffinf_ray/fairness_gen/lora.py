"""LoRA adapters (peft) on the diffusion autoencoder's UNet: conv and attention layers.

Targets: every Conv2d of the UNet (ResBlock convs, skips, input and output convs) and its
attention blocks' qkv / proj_out (1x1 Conv1d in the official architecture); with
`include_embedding_linears`, also each ResBlock's time/label (emb_layers) and z (cond_emb_layers)
projections. The semantic encoder is never adapted: z = E(x) stays the base model's, so the z
priors fitted with it stay valid. Targets are passed to peft as one anchored regex of exact
module names (peft's plain-name matching is by suffix and would also hit encoder modules).

After `add_lora`, only the lora_A / lora_B weights require grad; the base weights sit under
`<module>.base_layer.*` unchanged. The adapter alone is saved (`lora_state`, a few % of the
model) and put back on a freshly loaded base with `load_lora_state`.
"""

from __future__ import annotations

import re

from torch import nn

ENCODER_PREFIX = "encoder."
EMBEDDING_LINEARS = ("emb_layers.1", "cond_emb_layers.1")


def lora_targets(model: nn.Module, include_embedding_linears: bool = False) -> list[str]:
    """Names of the UNet modules LoRA adapts (module docstring), in module order."""
    names = []
    for name, module in model.named_modules():
        if name.startswith(ENCODER_PREFIX):
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            names.append(name)
        elif include_embedding_linears and isinstance(module, nn.Linear) and \
                name.endswith(EMBEDDING_LINEARS):
            names.append(name)
    if not names:
        raise ValueError("no conv or attention layer to adapt outside the semantic encoder")
    return names


def lora_config(targets: list[str], rank: int, alpha: float):
    from peft import LoraConfig

    pattern = "|".join(re.escape(t) for t in targets)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=pattern,
                      bias="none")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None = None):
    """`model` with LoRA adapters injected in place on `targets` (default `lora_targets`);
    every non-LoRA parameter frozen. Returns the same module."""
    from peft import inject_adapter_in_model

    targets = targets if targets is not None else lora_targets(model)
    model = inject_adapter_in_model(lora_config(targets, rank, alpha), model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def lora_state(model: nn.Module) -> dict:
    """The adapter's tensors only (peft's names, without the adapter name)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state(model: nn.Module, state: dict) -> nn.Module:
    """Put a saved adapter on a model that `add_lora` prepared with the same targets and rank;
    every adapter tensor must find its place."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"LoRA state does not fit: unexpected {unexpected[:5]}, "
                         f"missing {missing[:5]}")
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
