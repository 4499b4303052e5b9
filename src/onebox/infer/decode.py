"""The fast decode path as a model-to-model conversion: `to_decode(model, kernels)` returns a model
that runs its one-token decode steps through onebox's Triton kernels (`infer/kernels/`) and everything
else as the plain model does, with the same weights and state dict.

As gpt-fast's quantize.py swaps nn.Linear for its own modules, the conversion replaces each block's
attention and feed-forward with subclasses whose forward takes the kernels where they apply (one row on
CUDA in bf16 or fp16) and the model's own forward otherwise (prefill, CPU, fp32), and the root with a
subclass whose output layer and KV caches are the decode ones. The plain model (`onebox.model`) knows
nothing of this. Kernels (a comma-separated choice, `parse_kernels`):
gemv (the one-row products, and a mixture of experts' products of the chosen experts in place), attention (over each row's filled cache only), rope (RoPE and the cache
write folded into the attention kernel, whose chunks merge themselves through counters the decode
cache holds), pdl (programmatic dependent launch for the products and for inductor's kernels in the
step: Hopper and later), chain (pdl, and each kernel lets the next launch right after its wait; the
folded-RoPE attention is launched with PDL too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onebox.config import ModelConfig
from onebox.errors import OneboxError
from onebox.infer.kernels import (
    CHAIN,
    LAUNCH,
    attention_usable,
    available,
    decode_attention,
    linear,
    pdl_available,
    rope_decode_attention,
)
from onebox.infer.kernels.experts import moe_decode
from onebox.infer.kernels.experts import usable as experts_usable
from onebox.model import (
    Attention,
    Block,
    FeedForward,
    KVCache,
    KVRows,
    Transformer,
    apply_rope,
    cached_attention,
    fuse_projections,
)
from onebox.moe import MoE

KERNELS = ("gemv", "attention", "rope", "pdl", "chain")
LAUNCHES = {"pdl", "chain"}  # how the kernels are launched (Hopper and later), not which
DEFAULT = "gemv,attention,rope,pdl,chain"


def parse_kernels(setting: bool | str | None, device: torch.device) -> list[str]:
    """The kernels a decode model on `device` uses: True (all), False (none: cuBLAS and SDPA), None (all
    wherever they run: CUDA with Triton; pdl and chain on Hopper and later) or a comma-separated choice."""
    if setting is None:
        setting = DEFAULT if available(device) else False
    chosen = set(KERNELS) if setting is True else set(setting.split(",")) if setting else set()
    if chosen - set(KERNELS):
        raise OneboxError(f"unknown decode kernels {sorted(chosen - set(KERNELS))}: choose among {', '.join(KERNELS)}.")
    if "chain" in chosen:
        chosen.add("pdl")
    if not pdl_available(device):
        chosen -= LAUNCHES  # needs Hopper or later: the kernels launch the ordinary way
    return sorted(chosen)


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row products go through `gemv` (`pdl`: with programmatic dependent launch)."""

    def __init__(self, linear_: nn.Linear, pdl: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear_.in_features, linear_.out_features
        self.weight, self.bias = linear_.weight, linear_.bias
        self.pdl = pdl

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.pdl)


class DecodeKVCache(KVCache):
    """A KV cache with one counter per (row, query head) for the decode attention kernel: its chunks' programs
    take a ticket each and the last one merges their results, leaving the counters at zero for the next step."""

    def __init__(self, batch: int, heads: int, *args, **kwargs) -> None:
        super().__init__(batch, *args, **kwargs)
        self.register_buffer(
            "counts", torch.zeros(batch, heads, dtype=torch.int32, device=self.k.device), persistent=False
        )

    def rows(self, start: int, stop: int) -> DecodeKVCache:
        view = super().rows(start, stop)
        view.counts = self.counts[start:stop]
        return view

    def expand_batch(self, batch: int) -> None:
        super().expand_batch(batch)
        self.counts = self.counts.expand(batch, -1).contiguous()


def _share(target: nn.Module, source: nn.Module) -> None:
    """Give `target` (constructed without running its class's __init__) the modules, parameters, buffers and
    attributes of `source`: the same tensors, so the state dict is unchanged."""
    nn.Module.__init__(target)
    for key, value in vars(source).items():
        if not key.startswith("_") and key != "training":
            setattr(target, key, value)
    target._modules.update(source._modules)
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    target.train(source.training)


class DecodeAttention(Attention):
    """Attention whose one-token cached step runs through the kernels: the fused q/k/v product, the
    attention over the cache (with RoPE and the cache write folded in, where `rope`), the output product."""

    def __init__(self, attn: Attention, gemv: bool, attention: bool, rope: bool, pdl: int) -> None:
        _share(self, attn)
        self.gemv, self.attention, self.rope, self.pdl = gemv, attention, rope, pdl
        if gemv:
            self.o_proj = GemvLinear(attn.o_proj, pdl)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | KVRows | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        batch, seq, _ = x.shape
        if cache is None or seq != 1 or self.qkv_weight is None or not isinstance(cache, KVCache):
            return super().forward(x, cos, sin, cache, input_pos)
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.gemv:
            project = linear(x, self.qkv_weight, self.qkv_bias, pdl=self.pdl)
        else:
            project = F.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = self.split_heads(*project.split([q_dim, kv_dim, kv_dim], dim=-1), batch, 1)
        if self.rope and self._folds(q, k, v, cache):
            counts = getattr(cache, "counts", None)  # the chunks merge themselves where the cache holds counters
            if counts is not None and (counts.numel() != q.shape[0] * q.shape[1] or not counts.is_contiguous()):
                counts = None
            out = rope_decode_attention(q, k, v, cos, sin, cache.k, cache.v, input_pos, pdl=self.pdl, counts=counts)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = cache.update(input_pos, k, v)
            if self.attention and attention_usable(q, k):
                out = decode_attention(q, k, v, input_pos, pdl=self.pdl)
            else:
                out = cached_attention(q, k, v, input_pos)
        return self.o_proj(out.transpose(1, 2).reshape(batch, 1, q_dim))

    @staticmethod
    def _folds(q: Tensor, k: Tensor, v: Tensor, cache: KVCache) -> bool:
        """Whether the folded-RoPE kernel takes this step: a whole cache of q's dtype, contiguous."""
        return (
            cache.k.dtype == q.dtype
            and attention_usable(q, cache.k)
            and k.stride(-1) == 1
            and v.stride(-1) == 1
            and cache.k.is_contiguous()
            and cache.v.is_contiguous()
        )


class DecodeFeedForward(FeedForward):
    """The feed-forward whose one-row products (fused gate/up, down) go through `gemv`."""

    def __init__(self, mlp: FeedForward, pdl: int) -> None:
        _share(self, mlp)
        self.pdl = pdl
        self.down_proj = GemvLinear(mlp.down_proj, pdl)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_weight is None:
            return super().forward(x)
        gate, up = linear(x, self.gate_up_weight, self.gate_up_bias, pdl=self.pdl).chunk(2, dim=-1)
        gate = F.silu(gate) if self.activation == "swiglu" else F.relu(gate).square()
        return self.down_proj(gate * up)


class DecodeMoE(MoE):
    """The sparse feed-forward whose decode steps (tokens x top-k at most the number of experts) multiply each
    token's chosen experts in place through the expert kernel (`kernels.experts`)."""

    def __init__(self, moe: MoE) -> None:
        _share(self, moe)

    def compute(self, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        if chosen.numel() <= self.gate_up.shape[0] and experts_usable(x, self.gate_up):
            return moe_decode(x, self.gate_up, self.down, chosen, weights)
        return super().compute(x, chosen, weights)


class DecodeTransformer(Transformer):
    """The root of a decode model: the output layer through `gemv`, and decode KV caches (with counters)."""

    def __init__(self, model: Transformer, kernels: list[str], pdl: int) -> None:
        _share(self, model)
        self.kernels, self.pdl = kernels, pdl

    def logits(self, hidden: Tensor) -> Tensor:
        if "gemv" not in self.kernels:
            return super().logits(hidden)
        out = linear(hidden, self.output_weight, pdl=self.pdl)
        cap = self.config.logit_softcap
        return cap * torch.tanh(out / cap) if cap > 0 else out

    def new_kv_caches(self, batch: int, max_seq: int | None = None, dtype: torch.dtype | None = None) -> list[KVCache]:
        weight, config = self.embed_tokens.weight, self.config
        return [
            DecodeKVCache(
                batch,
                config.heads,
                config.kv_heads,
                max_seq or config.seq_len,
                config.head_size,
                dtype or weight.dtype,
                weight.device,
            )
            for _ in self.layers
        ]


def kernel_notes(config: ModelConfig, chosen: list[str]) -> list[str]:
    """Why some of the chosen kernels will not run for this model (its steps then take the reference path)."""
    notes = []
    head = config.head_size
    if {"attention", "rope"} & set(chosen) and (head < 16 or head & (head - 1)):
        notes.append(
            f"the decode attention kernel takes head sizes that are powers of two from 16; this model's is {head}: "
            "attention over the cache runs through SDPA"
        )
    return notes


def _decode_block(block: Block, chosen: list[str], pdl: int) -> Block:
    """A new block sharing `block`'s weights, its attention and (with gemv) feed-forward the decode ones."""
    new = Block.__new__(Block)
    _share(new, block)
    gemv = "gemv" in chosen
    new.self_attn = DecodeAttention(block.self_attn, gemv, "attention" in chosen, "rope" in chosen, pdl)
    if gemv and isinstance(block.mlp, FeedForward):
        new.mlp = DecodeFeedForward(block.mlp, pdl)
    elif gemv and type(block.mlp) is MoE:  # an offloaded MoE brings its own expert cache's way
        new.mlp = DecodeMoE(block.mlp)
    return new


def to_decode(model: Transformer, kernels: bool | str | None = None) -> Transformer:
    """The decode model of `model`: a DecodeTransformer sharing every weight (q/k/v and gate/up fused first,
    `fuse_projections`, which only makes views), its blocks new ones with the decode attention and
    feed-forward; `model` itself is left as it was. With no kernel chosen, the fused model itself."""
    if isinstance(model, DecodeTransformer):
        return model
    chosen = parse_kernels(kernels, model.embed_tokens.weight.device)
    model = fuse_projections(model.eval())
    if not chosen:
        return model
    pdl = ("pdl" in chosen) * LAUNCH | ("chain" in chosen) * CHAIN
    decode = DecodeTransformer(model, chosen, pdl)
    decode.layers = nn.ModuleList(_decode_block(block, chosen, pdl) for block in model.layers)
    decode.notes = kernel_notes(model.config, chosen)
    return decode
