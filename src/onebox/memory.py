"""Memory estimates for training (weights, gradients, optimizer state, activations)."""

from __future__ import annotations

from dataclasses import dataclass

from onebox.config import ModelConfig


@dataclass
class MemoryEstimate:
    """Predicted bytes of a training step, by kind, and the peak they add up to."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    low_precision_weights: int  # autocast's bf16 copies, kept by autograd until backward uses them

    @property
    def total(self) -> int:
        """Predicted peak: the larger of the start of backward and the optimizer step.

        At the start of backward the activations and the bf16 weight copies are alive (gradients
        are not yet); at the optimizer step all gradients exist and the activations are gone.
        """
        backward = self.weights + self.optimizer + self.low_precision_weights + self.activations
        step = self.weights + self.gradients + self.optimizer
        return max(backward, step)


def activation_bytes_per_token(config: ModelConfig, mixed: bool, compiled: bool) -> tuple[int, int]:
    """(bytes one layer keeps for backward per token, bytes the loss keeps per token).

    With a = 2 bytes under bf16 autocast (4 in fp32), a layer keeps: the fp32 residual entering
    each norm (2 x 4d), the norms' outputs (2 a d), q, k and v after RoPE (a (d + 2 kv)), the
    attention output and its reshaped copy (2 a d), and gate, up and their product (3 a hidden).
    Eager mode keeps two more tensors that compiled blocks recompute: each norm's fp32 normalised
    copy (2 x 4d) and the activation's output (a hidden). The loss keeps the logits, their fp32
    copy and its gradient (a + 8 bytes per vocabulary entry). Calibrated against measured peaks on
    an H100 (results/h100): within 5% from 600m to 5b.
    """
    a = 2 if mixed else 4
    d, h = config.dim, config.hidden
    layer = 8 * d + 2 * a * d + a * (d + 2 * config.kv_dim) + 2 * a * d + 3 * a * h
    if not compiled:
        layer += 8 * d + a * h
    return layer, (a + 8) * config.vocab_size


def estimate_training_memory(
    config: ModelConfig,
    batch: int,
    mixed: bool = True,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
    compiled: bool = True,
) -> MemoryEstimate:
    """Predicted peak memory of one training step with fp32 master weights."""
    params = config.num_params()
    optimizer_bytes = 8 * params if optimizer == "adamw" else 4 * params  # Adam: two moments; Muon: one buffer
    layer, loss = activation_bytes_per_token(config, mixed, compiled)
    if activation_checkpointing:  # only block inputs (fp32) are kept; one block is recomputed at a time
        per_token = 4 * config.dim * config.layers + layer + loss
    else:
        per_token = config.layers * layer + loss
    low = 2 * params if mixed else 0
    return MemoryEstimate(4 * params, 4 * params, optimizer_bytes, batch * config.seq_len * per_token, low)


def out_of_memory_message(
    config: ModelConfig, batch: int, mixed: bool, optimizer: str, activation_checkpointing: bool, where: str
) -> str:
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
