"""transformers' generate() on one preset's shape, set up several ways, to see which choices set its speed.

  PYTHONPATH=src python benchmarks/hf_decode_probe.py --preset 600m-A --batch 1 --new-tokens 128 --out $OUT

Each variant builds LlamaForCausalLM of the preset's shape (random weights) and times one greedy
generate() of --new-tokens tokens after a 128-token prompt (the whole call, its prefill included),
after warm-up calls. Variants:
  docs        an exported folder loaded with from_pretrained(dtype=bfloat16) onto the GPU, generate(input_ids,
              attention_mask) as transformers' documentation shows it (the dynamic cache)
  docs-static the same with cache_implementation="static" (transformers compiles the forward itself)
  bench       bench decode's baseline (both caches), after the Engine ran as bench decode runs it
  built       the model built from its config on the device (fp32 then cast to bf16), as onebox's baseline did
  built+FLAG  ... with one or more of: load (onebox's weights loaded with load_state_dict, lm_head tied after),
              p0 (bench decode's prompts), min (min_new_tokens fixing the length), pad (pad_token_id=0 and no attention
              mask), imode (under torch.inference_mode()), short (warmed up by a 4-token generate() instead of a full one)
  onebox-FLAG all those flags but one (with all of them and a 4-token warm-up as the only one in the process, the
              first timed call pays its first-time costs: see docs/perf/decode-baseline-h200-2026-12.md)
  after-engine the docs variant again, after onebox's Engine compiled and ran its decode step in this process
It prints one line per variant and a table last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from onebox.bench.decode import HF_CACHES, _prompts, hf_baseline, hf_generate_speed, time_decode
from onebox.export import export_hf, hf_config, hf_state_dict
from onebox.infer.engine import Engine
from onebox.model import build_model
from onebox.presets import PRESETS

ALL_FLAGS = ("load", "p0", "min", "pad", "imode", "short")


def timed(model, ids: torch.Tensor, new_tokens: int, warmups: int, inference: bool = False, **kwargs) -> float:
    context = torch.inference_mode() if inference else torch.no_grad()
    with context:
        for _ in range(warmups):
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
        torch.cuda.synchronize()
    return ids.shape[0] * (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="600m-A")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--variants", default="bench,docs,docs-static,built,built+min,built+pad,built+imode,after-engine"
    )
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    import transformers

    device = torch.device("cuda")
    config = PRESETS[args.preset]
    model = build_model(config, device, torch.bfloat16).eval()
    folder = Path(tempfile.mkdtemp()) / "hf"
    export_hf(model.state_dict(), config, None, folder, "bfloat16")
    ids = torch.randint(1, config.vocab_size, (args.batch, 128), device=device)
    mask = torch.ones_like(ids)
    rows = []
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        if variant == "bench":  # bench decode's baseline, both caches, after the engine ran (as there)
            engine = Engine(model, max_batch=args.batch, prefix_entries=0)
            time_decode(engine, args.batch, 128, args.new_tokens)
            del engine
            hf = hf_baseline(model)
            for cache in HF_CACHES:
                speed = hf_generate_speed(hf, config, args.batch, 128, args.new_tokens, cache)
                rows.append({"variant": f"bench-{cache}", "tokens_per_second": speed})
            del hf
            continue
        if variant.startswith("docs") or variant == "after-engine":
            if variant == "after-engine":
                engine = Engine(model, max_batch=args.batch, prefix_entries=0)
                print(f"engine first: {time_decode(engine, args.batch, 128, args.new_tokens):,.0f} tok/s", flush=True)
                del engine
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.bfloat16, device_map="cuda"
            ).eval()
            extra = {"cache_implementation": "static"} if variant == "docs-static" else {}
            speed = timed(hf, ids, args.new_tokens, 3 if extra else 1, attention_mask=mask, **extra)
            del hf
        else:  # built[+flags], or onebox (all flags) with -flag taking one away
            flags = set(ALL_FLAGS) if variant.startswith("onebox") else set()
            for part in variant.replace("-", " -").replace("+", " +").split()[1:]:
                (flags.discard if part[0] == "-" else flags.add)(part[1:])
            hf_cfg = transformers.LlamaConfig(**hf_config(config, "bfloat16", None))
            hf_cfg._attn_implementation = "sdpa"
            with torch.device(device):
                hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
            if "load" in flags:  # onebox's weights, lm_head tied afterwards
                hf.load_state_dict(hf_state_dict(model.state_dict(), config, torch.bfloat16), strict=False)
                hf.tie_weights()
            prompt = torch.tensor(_prompts(config, args.batch, 128, 7), device=device) if "p0" in flags else ids
            kwargs = {"pad_token_id": 0} if "pad" in flags else {"attention_mask": mask}
            if "min" in flags:
                kwargs["min_new_tokens"] = args.new_tokens
            if "short" in flags:  # warm up with a 4-token generate(), not one of the timed length
                with torch.inference_mode():
                    hf.generate(
                        prompt,
                        max_new_tokens=4,
                        do_sample=False,
                        **{k: (4 if k == "min_new_tokens" else v) for k, v in kwargs.items()},
                    )
            speed = timed(
                hf, prompt, args.new_tokens, 0 if "short" in flags else 1, inference="imode" in flags, **kwargs
            )
            del hf
        print(f"{variant}: {speed:,.1f} tok/s", flush=True)
        rows.append({"variant": variant, "tokens_per_second": speed})
        torch.cuda.empty_cache()
    Path(args.out, f"hf-decode-{args.preset}-b{args.batch}.json").write_text(json.dumps(rows, indent=2))
    print(
        f"\n{'variant':<14} tok/s  ({args.preset}, batch {args.batch}, {args.new_tokens} new tokens, {torch.cuda.get_device_name()})"
    )
    for row in rows:
        print(f"{row['variant']:<14} {row['tokens_per_second']:,.1f}")


if __name__ == "__main__":
    main()
