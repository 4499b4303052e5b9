"""The peers the benchmarks time onebox against, built the way their own documentation makes them fast:
transformers' model of the same family and shape (LlamaForCausalLM, Qwen3ForCausalLM, ...) with SDPA."""

from __future__ import annotations

from typing import Any

import torch

from onebox.config import ModelConfig
from onebox.device import quiet_optional_imports
from onebox.errors import OneboxError


def transformers_model(config: ModelConfig, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Any:
    """A freshly initialised transformers model of the config's family and shape, in `dtype` on `device`."""
    quiet_optional_imports()
    try:
        import transformers
    except ImportError:
        raise OneboxError(
            "--baseline needs the transformers package: pip install transformers (or onebox[dev])."
        ) from None
    from onebox.families import hf_config

    fields = hf_config(config, str(dtype).replace("torch.", ""), None)
    hf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocated once in dtype, whatever this transformers calls its dtype argument
    try:
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(hf)
    finally:
        torch.set_default_dtype(default)
