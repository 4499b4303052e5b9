"""The decoder-only LLaMA-style Transformer as plain nn.Modules, and its static KV cache.

Module and parameter names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers.N.self_attn.
q_proj, ..., mlp.gate_proj, input_layernorm, norm, lm_head), and rotary embeddings use its
rotate-half convention, so export is a renaming with no permutation. The model knows nothing of
training: compile, activation checkpointing and fused losses are applied from outside.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onebox.config import ModelConfig
from onebox.errors import OneboxError
from onebox.moe import MoE
from onebox.rope import apply_rope as apply_rope
from onebox.rope import model_rope_tables
from onebox.rope import rope_tables as rope_tables


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (self.weight * normed.to(x.dtype)).to(x.dtype)  # x's dtype also where the scale is fp32 and x is not


class KVCache(nn.Module):
    """Static key/value buffers for one layer: (batch, kv_heads, max_seq, head_dim)."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        max_seq: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, kv_heads, T, head_dim) at positions input_pos ((T,), or (B, T) per row); return the whole cache."""
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start:stop of this one, sharing its memory (a slot of a batched cache)."""
        view = type(self).__new__(type(self))
        nn.Module.__init__(view)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        return view

    def select(self, rows: Tensor) -> KVRows:
        """Rows `rows` (a 1-D index tensor) of this cache, for a prefill that fills several slots at once."""
        return KVRows(self, rows)

    def expand_batch(self, batch: int) -> None:
        """Repeat a batch-1 cache (after one shared prefill) for `batch` sequences."""
        self.k = self.k.expand(batch, -1, -1, -1).contiguous()
        self.v = self.v.expand(batch, -1, -1, -1).contiguous()


class KVRows:
    """Some rows of a batched KVCache: writes land in those rows; reads return a copy of them."""

    def __init__(self, cache: KVCache, rows: Tensor) -> None:
        self.cache, self.rows = cache, rows

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, kv_heads, T, head_dim) at per-row positions input_pos (B, T); return these rows' whole cache."""
        cache, rows = self.cache, self.rows[:, None]
        cache.k[rows, :, input_pos] = k.transpose(1, 2).to(cache.k.dtype)
        cache.v[rows, :, input_pos] = v.transpose(1, 2).to(cache.v.dtype)
        return cache.k[self.rows], cache.v[self.rows]


def cached_attention(q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
    """q (B, H, T, D) at positions input_pos ((T,), or (B, T) per row) against a whole cache k, v
    (B, KV, S, D): the query at position p sees the cached keys at positions <= p; later slots are masked."""
    mask = torch.arange(k.shape[2], device=q.device) <= input_pos[..., None]  # (T, S), or (B, T, S) per row
    if mask.dim() == 3:
        mask = mask[:, None]
    return F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
    )


def rope_cached_attention(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | KVRows, input_pos: Tensor
) -> Tensor:
    """Attention with a cache: q and k (B, H or KV, T, D) rotated, k and v written into the cache at
    input_pos, then attention over the cache (the reference of infer.kernels.rope_decode_attention)."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = cache.update(input_pos, k, v)
    return cached_attention(q, k, v, input_pos)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query key/value heads, through SDPA."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.heads, config.kv_heads, config.head_size
        self.q_proj = nn.Linear(config.dim, config.q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, config.kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, config.kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_dim, config.dim, bias=config.o_bias)
        self.q_norm = RMSNorm(config.head_size, config.norm_eps) if config.qk_norm else None  # per head (Qwen3)
        self.k_norm = RMSNorm(config.head_size, config.norm_eps) if config.qk_norm else None
        self.register_buffer("qkv_weight", None, persistent=False)  # set by fuse_projections (inference)
        self.register_buffer("qkv_bias", None, persistent=False)

    def heads_of(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, D), k and v (B, KV, T, D) of x (B, T, dim): projected (fused for inference), q and k
        normed per head where the model does so, not yet rotated."""
        batch, seq, _ = x.shape
        if self.qkv_weight is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_dim = self.kv_heads * self.head_dim
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(
                [self.heads * self.head_dim, kv_dim, kv_dim], dim=-1
            )
        return self.split_heads(q, k, v, batch, seq)

    def split_heads(self, q: Tensor, k: Tensor, v: Tensor, batch: int, seq: int) -> tuple[Tensor, Tensor, Tensor]:
        q = q.view(batch, seq, self.heads, self.head_dim)
        k = k.view(batch, seq, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(batch, seq, self.kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | KVRows | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.heads_of(x)
        if cache is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        else:
            out = rope_cached_attention(q, k, v, cos, sin, cache, input_pos)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """Gated FFN: down(act(gate(x)) * up(x)) with act = SiLU (SwiGLU) or ReLU^2."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.gate_proj = nn.Linear(config.dim, config.hidden, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.hidden, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.hidden, config.dim, bias=config.mlp_bias)
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by fuse_projections (inference)
        self.register_buffer("gate_up_bias", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_weight is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        gate = F.silu(gate) if self.activation == "swiglu" else F.relu(gate).square()
        return self.down_proj(gate * up)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoE(config) if config.experts else FeedForward(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | KVRows | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, input_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Decoder-only language model: token ids (B, T) -> logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = model_rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @property
    def output_weight(self) -> Tensor:
        """The (vocab, dim) output projection: the embedding matrix when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; output projections of each block scaled by 1/sqrt(2L). The same
        seed gives the same weights in any dtype and sharded over any number of processes."""
        for name, param in self.named_parameters():
            self.init_parameter(name, param)
        self.reset_rope()

    @torch.no_grad()
    def init_parameter(self, name: str, param: Tensor) -> None:
        """Initialise one parameter (by its name in this model) in place; see init_weights (a shard under
        FSDP2: `distributed.init_sharded`)."""
        std = self.config.init_std
        if name.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight")) or name == "norm.weight":
            param.fill_(1.0)
            return
        if name.endswith(".bias"):
            param.zero_()
            return
        if name.endswith(("o_proj.weight", "down_proj.weight", "mlp.down")):
            std = std / math.sqrt(2 * self.config.layers)
        if param.dtype == torch.float32:
            param.normal_(0.0, std)
        else:  # drawn in fp32 and rounded: a bf16 model starts from the fp32 model's weights (same seed), one parameter at a time
            param.copy_(torch.empty(param.shape, dtype=torch.float32, device=param.device).normal_(0.0, std))

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Recompute the rotary tables in place (needed after to_empty, e.g. from the meta device)."""
        if self.rope_cos.device.type != "meta":  # always fp32, even in a model cast to bf16
            self.rope_cos, self.rope_sin = model_rope_tables(self.config, self.rope_cos.device)

    def hidden_states(
        self, idx: Tensor, input_pos: Tensor | None = None, caches: Sequence[KVCache | KVRows] | None = None
    ) -> Tensor:
        """Final normed hidden states (B, T, dim). With caches, input_pos (T,) gives the positions."""
        if caches is None:
            seq = idx.shape[1]
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        x = self.embed_tokens(idx)
        if x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type):
            # Under autocast the residual stream is fp32 whatever the weights' dtype, so bf16 weights
            # (the low-memory strategies) compute exactly what fp32 weights of the same values do.
            x = x.float()
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], input_pos)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Project hidden states to vocabulary logits, soft-capped when the config asks."""
        out = F.linear(hidden, self.output_weight)
        cap = self.config.logit_softcap
        return cap * torch.tanh(out / cap) if cap > 0 else out

    def forward(
        self, idx: Tensor, input_pos: Tensor | None = None, caches: Sequence[KVCache | KVRows] | None = None
    ) -> Tensor:
        return self.logits(self.hidden_states(idx, input_pos, caches))

    def new_kv_caches(self, batch: int, max_seq: int | None = None, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One static KV cache per layer on the model's device."""
        weight = self.embed_tokens.weight
        return [
            KVCache(
                batch,
                self.config.kv_heads,
                max_seq or self.config.seq_len,
                self.config.head_size,
                dtype or weight.dtype,
                weight.device,
            )
            for _ in self.layers
        ]


def build_model(
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    state: Mapping[str, Tensor] | None = None,
    expert_device: torch.device | str | None = None,
) -> Transformer:
    """The one way a Transformer is built: on the meta device first, then allocated once in `dtype` on
    `device` (so a 20B model in bf16 never needs its fp32 size) and either initialised from the seed or
    filled from `state` (strict: every weight, nothing else). On the meta device nothing is allocated:
    that model is for sharding before memory is taken (`to_empty` + `init_weights` afterwards).
    Rotary tables stay fp32. With the same seed every dtype starts from the same weights (rounded to
    it), so the memory strategies are compared from one starting point. `expert_device`: where a mixture of
    experts' expert stacks are allocated instead (host memory, pinned, for experts paged to a GPU; "meta" leaves them
    unallocated and unread, for experts read from the model's files when needed)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype)
    if torch.device(device).type == "meta":
        return model
    apart = []  # (module, name, meta parameter) of the experts, allocated on expert_device
    if expert_device is not None:
        for block in model.layers:
            if isinstance(block.mlp, MoE):
                apart += [(block.mlp, name, block.mlp._parameters.pop(name)) for name in ("gate_up", "down")]
    model.to_empty(device=device)
    pin = torch.device(expert_device or "meta").type == "cpu" and torch.device(device).type == "cuda"
    for module, name, param in apart:  # pinned in host memory for a GPU: copied to it without staging
        value = torch.empty(param.shape, dtype=param.dtype, device=expert_device, pin_memory=pin)
        module.register_parameter(name, nn.Parameter(value))
    if state is None:
        model.init_weights()
    else:
        load_weights(model, state)
        model.reset_rope()
    return model


@torch.no_grad()
def load_weights(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy `state` into the model one tensor at a time, converting to each parameter's dtype and device, so a
    lazy mapping (weights read from memory-mapped files as they are asked for) never holds a second copy of
    the model; every weight must be there with the model's shape, and nothing else."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state.keys())), sorted(set(state.keys()) - set(own))
    if missing or unexpected:
        raise OneboxError(
            f"the weights do not match the model's config: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Check that the config belongs to these weights."
        )
    for name, target in own.items():
        if target.device.type == "meta":  # left unallocated on purpose (build_model's expert_device)
            continue
        source = state[name]
        if tuple(source.shape) != tuple(target.shape):
            raise OneboxError(
                f"{name} has shape {tuple(source.shape)} in the weights but {tuple(target.shape)} by the model's config: "
                "the config does not describe these weights."
            )
        target.copy_(source)


@torch.no_grad()
def fuse_projections(model: Transformer) -> Transformer:
    """For inference: each block's q/k/v weights, and its gate/up weights, become views of one concatenated
    matrix (so no memory is added once done), and the forward runs one matrix product where it ran three,
    and two: at decode, where every product is a small matrix-vector one, fewer kernels is most of the
    gain. Training keeps them apart (measured slower fused). Idempotent."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_weight is None:
            attn.qkv_weight, attn.qkv_bias = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        if isinstance(mlp, FeedForward) and mlp.gate_up_weight is None:  # (experts are stored fused already)
            mlp.gate_up_weight, mlp.gate_up_bias = _fused([mlp.gate_proj, mlp.up_proj])
    return model


def _fused(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One matrix (and bias) concatenating the linears' rows; each linear's own becomes a view of it."""
    weight = torch.cat([m.weight for m in linears])
    for m, part in zip(linears, weight.split([m.out_features for m in linears])):
        m.weight.data = part
    if linears[0].bias is None:
        return weight, None
    bias = torch.cat([m.bias for m in linears])
    for m, part in zip(linears, bias.split([m.out_features for m in linears])):
        m.bias.data = part
    return weight, bias


def cross_entropy_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean token cross-entropy in fp32 (the reference loss)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
