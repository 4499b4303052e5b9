"""Memory estimates for training (weights, gradients, optimizer state, activations)."""

from __future__ import annotations

from dataclasses import dataclass

from onebox.config import ModelConfig


@dataclass
class MemoryEstimate:
    """Predicted bytes of a training step, by kind."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        """Sum of all parts."""
        return self.weights + self.gradients + self.optimizer + self.activations


def _layer_and_loss_bytes(config: ModelConfig, mixed: bool) -> tuple[int, int]:
    """(bytes kept per token by one layer, bytes kept per token by the loss) for onebox's unfused modules.

    Per layer, with a = 2 bytes under bf16 autocast (4 in fp32): the fp32 residual into each norm
    and its normed copy (2 x 8d), the norms' low-precision outputs (2 x a d), q/k/v after RoPE
    (a (d + 2 kv)), the attention output and its reshaped copy (2 a d) and the gated FFN's four
    hidden-size tensors (4 a hidden). The loss keeps the logits, their fp32 copy and its softmax
    (a + 8 bytes per vocabulary entry).
    """
    a = 2 if mixed else 4
    d = config.dim
    layer = 16 * d + 2 * a * d + a * (d + 2 * config.kv_dim) + 2 * a * d + 4 * a * config.hidden
    return layer, (a + 8) * config.vocab_size


def estimate_training_memory(config: ModelConfig, batch: int, mixed: bool = True, optimizer: str = "adamw", activation_checkpointing: bool = False) -> MemoryEstimate:
    """Predicted peak memory of one training step: fp32 weights and gradients, optimizer state, activations."""
    params = config.num_params()
    optimizer_bytes = 8 * params if optimizer == "adamw" else 4 * params  # Adam: two moments; Muon: one buffer
    layer, loss = _layer_and_loss_bytes(config, mixed)
    if activation_checkpointing:  # only block inputs (fp32) are kept; one block is recomputed at a time
        per_token = 4 * config.dim * config.layers + layer + loss
    else:
        per_token = config.layers * layer + loss
    return MemoryEstimate(4 * params, 4 * params, optimizer_bytes, batch * config.seq_len * per_token)


def out_of_memory_message(config: ModelConfig, batch: int, mixed: bool, optimizer: str, activation_checkpointing: bool, where: str) -> str:
    """The one-paragraph error for an out-of-memory failure: the estimate and what reduces it."""
    estimate = estimate_training_memory(config, batch, mixed, optimizer, activation_checkpointing)
    gb = 1e9
    return (
        f"out of {where} memory training {config.name} ({config.num_params() / 1e6:,.0f}M params) at batch {batch} x seq {config.seq_len}. "
        f"Estimated need: {estimate.total / gb:.1f} GB (weights {estimate.weights / gb:.1f}, gradients {estimate.gradients / gb:.1f}, "
        f"optimizer {estimate.optimizer / gb:.1f}, activations {estimate.activations / gb:.1f}). To reduce it: lower --batch-size "
        f"and raise --grad-accum to keep the tokens per step, set --activation-checkpointing true, shorten --seq-len, "
        f"or choose a smaller preset."
    )
