"""LoRA: low-rank adapters on a frozen model, applied from outside it (the model's code does not change).

Each targeted linear layer W (out, in) becomes W x + scale * B (A (dropout x)), with A (rank, in) drawn as
peft draws it (Kaiming-uniform), B (out, rank) zero, scale = alpha / rank: at the start the adapted model
is the base model. Only A and B train; every other weight is frozen. The targets are named as in the
Hugging Face families (q, k, v, o: self_attn.{q,k,v,o}_proj; gate, up, down: mlp.{gate,up,down}_proj);
the default is all seven, as QLoRA found adapting every linear layer of a block is what matches full
fine-tuning. A trained adapter is either merged into the weights (W + scale B A: a plain model of the
same family) or written as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads onto the
transformers base.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onebox.config import LORA_TARGETS, TrainConfig, lora_targets
from onebox.errors import OneboxError

TARGETS = dict(
    zip(LORA_TARGETS, [f"self_attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}_proj" for n in ("gate", "up", "down")])
)
DEFAULT_TARGETS = ",".join(TARGETS)


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    def names(self) -> list[str]:
        """The targets as module paths within a block, checked."""
        return [TARGETS[t] for t in lora_targets(self.rank, self.alpha, self.dropout, self.targets)]


def spec_of(train: TrainConfig) -> LoRASpec | None:
    """The LoRA adapters a run trains (None: full fine-tuning)."""
    return (
        LoRASpec(train.lora_rank, train.lora_alpha, train.lora_dropout, train.lora_targets) if train.lora_rank else None
    )


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, spec: LoRASpec) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        device = weight.device if weight.device.type != "meta" else "meta"
        self.lora_a = nn.Parameter(torch.empty(spec.rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, spec.rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as peft initialises lora_A
        self.scale = spec.alpha / spec.rank
        self.dropout = spec.dropout

    @property
    def weight(self) -> Tensor:  # what code reading a linear layer's weight sees: the frozen base
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        dropped = F.dropout(x, self.dropout, self.training) if self.dropout else x
        out = self.base(x)
        update = F.linear(F.linear(dropped.to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scale
        return out + update.to(out.dtype)

    def delta(self) -> Tensor:
        """scale x B A, the (out, in) update a merge adds to the base weight (fp32)."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale


def apply_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Freeze every weight of `model` and wrap the targeted linear layers of each block; returns the names of
    the adapter parameters (the only ones that train)."""
    paths = spec.names()
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        for path in paths:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, name, None)
            if not isinstance(layer, nn.Linear):
                raise OneboxError(
                    f"--lora-targets names {path}, which this model's blocks do not have as a linear layer "
                    "(a mixture of experts has no gate/up/down outside its experts): leave it out."
                )
            setattr(parent, name, LoRALinear(layer, spec))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapters(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters' tensors, by their names in the adapted model."""
    return {n: p.detach() for n, p in model.named_parameters() if "lora_a" in n or "lora_b" in n}


@torch.no_grad()
def load_adapters(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy saved adapters (adapter_state's names) into an adapted model: exactly its adapters, same shapes."""
    own = adapter_state(model)
    if set(own) != set(state):
        raise OneboxError(
            "the checkpoint's LoRA adapters do not match this run's (rank or targets differ): resume with the "
            "--lora-rank and --lora-targets it was trained with."
        )
    for name, tensor in own.items():
        if tensor.shape != state[name].shape:
            raise OneboxError(
                f"LoRA adapter {name} has shape {tuple(state[name].shape)} in the checkpoint, "
                f"{tuple(tensor.shape)} here: resume with the same --lora-rank."
            )
        tensor.copy_(state[name])


def base_state(model: nn.Module, merged: bool = False) -> dict[str, Tensor]:
    """The plain model's state dict (names without the wrappers): the frozen base, or with `merged` each
    adapted weight plus its update, in the weight's dtype."""
    state = {}
    wrapped = dict(adapters(model))
    for name, tensor in model.state_dict().items():
        if ".lora_a" in name or ".lora_b" in name:
            continue
        plain = name.replace(".base.", ".")
        owner = plain.rsplit(".", 1)[0]
        if merged and owner in wrapped and name.endswith(".base.weight"):
            tensor = (tensor.float() + wrapped[owner].delta().to(tensor.device)).to(tensor.dtype)
        state[plain] = tensor
    return state


def write_peft_adapter(model: nn.Module, spec: LoRASpec, out_dir: Path, base_model: str) -> None:
    """adapter_config.json and adapter_model.safetensors in PEFT's format into out_dir (which exists)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in adapters(model):
        key = f"base_model.model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = layer.lora_a.detach().float().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.lora_b.detach().float().cpu().contiguous()
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(path.split(".")[1] for path in spec.names()),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
