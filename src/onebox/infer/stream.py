"""Forward passes of models larger than GPU memory: blocks streamed from pinned host memory.

The first `resident` blocks, the embedding, final norm and output layer live on the device; the
other blocks live in pinned host memory. Two device-side block buffers take turns: while block j
computes in one, a copy stream fills the other with block j+1 (double buffering), so the transfer
hides behind compute whenever a block computes longer than it copies, and the pass costs at least
the streamed bytes over the host-to-device bandwidth (the floor `bench forward` reports).
On the CPU the same code runs with plain copies, which is how the tests check it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onebox.config import ModelConfig
from onebox.host import pinned_zeros
from onebox.model import Block, Transformer, build_model
from onebox.rope import model_rope_tables


class StreamedTransformer:
    """A Transformer whose blocks from `resident` on are kept in host memory and streamed in."""

    def __init__(self, model: Transformer, resident: int, device: torch.device) -> None:
        self.model, self.resident, self.device = model, resident, device
        self.streamed = list(model.layers)[resident:]
        dtype = model.embed_tokens.weight.dtype
        self.slots = [_empty_block(model.config, device, dtype) for _ in range(min(2, len(self.streamed)))]
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.slot_ready = [torch.cuda.Event() if cuda else None for _ in self.slots]
        self.slot_free = [torch.cuda.Event() if cuda else None for _ in self.slots]

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per forward pass."""
        return sum(p.numel() * p.element_size() for block in self.streamed for p in block.parameters())

    def _fill(self, index: int) -> None:
        """Copy streamed block `index` into its slot, after the slot's previous block has finished."""
        slot = index % len(self.slots)
        if self.copy_stream is None:
            _copy_block(self.slots[slot], self.streamed[index])
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.slot_free[slot])
            _copy_block(self.slots[slot], self.streamed[index])
            self.slot_ready[slot].record(self.copy_stream)

    @torch.inference_mode()
    def __call__(self, idx: Tensor) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T), as the resident model would compute them."""
        model = self.model
        seq = idx.shape[1]
        cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
        if self.copy_stream is not None:
            for event in self.slot_free:  # the slots are free: nothing uses them before this pass
                event.record()
        for j in range(len(self.slots)):
            self._fill(j)  # overlaps the resident blocks' compute
        x = model.embed_tokens(idx)
        for block in list(model.layers)[: self.resident]:
            x = block(x, cos, sin)
        for j in range(len(self.streamed)):
            slot = j % len(self.slots)
            if self.copy_stream is not None:
                torch.cuda.current_stream().wait_event(self.slot_ready[slot])
            x = self.slots[slot](x, cos, sin)
            if self.copy_stream is not None:
                self.slot_free[slot].record()
            if j + len(self.slots) < len(self.streamed):
                self._fill(j + len(self.slots))
        return model.logits(model.norm(x))


def _empty_block(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Block:
    with torch.device("meta"):
        block = Block(config).to(dtype)
    return block.to_empty(device=device).requires_grad_(False).eval()


@torch.no_grad()
def _copy_block(target: Block, source: Block) -> None:
    for t, s in zip(target.parameters(), source.parameters()):
        t.copy_(s, non_blocking=True)


@torch.no_grad()
def build_streamed(config: ModelConfig, device: torch.device, dtype: torch.dtype, resident: int) -> StreamedTransformer:
    """A randomly initialised model with `resident` blocks on the device and the rest in pinned host memory.

    Streamed blocks are initialised in a device buffer and copied out, which is far faster than
    sampling tens of GB of normals on the CPU; nothing is ever allocated at fp32 size.
    """
    resident = max(0, min(resident, config.layers))
    model = build_model(config, "meta", dtype)
    for name, child in model.named_children():
        if name != "layers":
            child.to_empty(device=device)
    pinned = []  # the registered host tensors: they must live as long as the parameters that use their pages
    for i, block in enumerate(model.layers):
        if i >= resident and device.type == "cuda":
            for module in block.modules():
                for name, p in [(n, p) for n, p in module._parameters.items() if p is not None]:
                    pinned.append(pinned_zeros(p.shape, dtype))
                    module._parameters[name] = nn.Parameter(pinned[-1], requires_grad=False)
        else:
            block.to_empty(device=device if i < resident else "cpu")
    names = dict(model.named_parameters())
    scratch = _empty_block(config, device, dtype) if resident < config.layers else None
    for i, block in enumerate(model.layers):
        for local, param in block.named_parameters():
            if i < resident:
                model.init_parameter(f"layers.{i}.{local}", param)
        if i >= resident:
            for (local, param), staged in zip(block.named_parameters(), scratch.parameters()):
                model.init_parameter(f"layers.{i}.{local}", staged)
                param.copy_(staged)
    for name, param in names.items():
        if not name.startswith("layers."):
            model.init_parameter(name, param)
    model.rope_cos, model.rope_sin = model_rope_tables(config, device)
    streamed = StreamedTransformer(model.eval(), resident, device)
    streamed.pinned = pinned
    return streamed
