"""GEMV probe: one-row bf16 products of the decode step's shapes, cuBLAS against Triton designs.

  python benchmarks/gemv_probe.py --presets 600m-A,3b-A [--attention]

Each design is checked against an fp32 reference, then timed inside one CUDA graph that runs it over
COPIES distinct weight matrices (more bytes than L2 holds, as in a decode step where every weight is
read once), and reported as TB/s of weight bytes. Designs: `tile` (a BLOCK_N x BLOCK_K fp32 tile
accumulated, summed at the end: onebox's kernel in infer/kernels/matvec.py), `rowsum` (summed every iteration: fewer registers, more
programs per SM), `splitk` (SPLIT programs share each row block's columns and write fp32 partials that a
second small kernel sums). For each design every config of a small grid is timed; the best is printed.
--attention times decode attention instead: SDPA under the mask against onebox's chunked kernel
(infer/kernels/attention.py) per chunk size and warp count.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from onebox.infer.kernels import matvec as gemv_kernel
from onebox.presets import PRESETS

COPIES = 24


@triton.jit
def rowsum_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None] * stride_w + cols[None, :],
            mask=(rows[:, None] < N) & (cols[None, :] < K),
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def splitk_kernel(x_ptr, w_ptr, part_ptr, N, K, stride_w, CHUNK, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, K), BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None] * stride_w + cols[None, :],
            mask=(rows[:, None] < N) & (cols[None, :] < K),
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        acc += w * x[None, :]
    tl.store(part_ptr + split * N + rows, tl.sum(acc, axis=1), mask=rows < N)


@triton.jit
def splitk_sum_kernel(part_ptr, y_ptr, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * N + rows, mask=rows < N, other=0.0)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


def run(design: str, cfg: dict, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, part: torch.Tensor) -> None:
    n, k = w.shape
    bn, bk, warps, stages = cfg["BN"], cfg["BK"], cfg["warps"], cfg["stages"]
    if design == "splitk":
        split = cfg["split"]
        chunk = triton.cdiv(triton.cdiv(k, split), bk) * bk
        splitk_kernel[(triton.cdiv(n, bn), split)](
            x, w, part, n, k, w.stride(0), chunk, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages
        )
        splitk_sum_kernel[(triton.cdiv(n, 256),)](part, y, n, SPLIT=split, BLOCK=256, num_warps=4)
    elif design == "tile":  # onebox's own kernel (infer/kernels/matvec.py)
        gemv_kernel._gemv_kernel[(triton.cdiv(n, bn),)](
            x,
            w,
            y,
            n,
            k,
            w.stride(0),
            BLOCK_N=bn,
            BLOCK_K=bk,
            PDL=False,
            CHAINED=False,
            num_warps=warps,
            num_stages=stages,
        )
    else:
        rowsum_kernel[(triton.cdiv(n, bn),)](
            x, w, y, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages
        )


def configs(design: str) -> list[dict]:
    out = []
    for bn, bk, warps, stages in itertools.product((4, 8, 16, 32), (128, 256, 512), (4, 8), (1, 3)):
        if not 1024 <= bn * bk <= 8192:
            continue
        if design == "splitk":
            out += [dict(BN=bn, BK=bk, warps=warps, stages=stages, split=s) for s in (2, 4)]
        else:
            out.append(dict(BN=bn, BK=bk, warps=warps, stages=stages))
    return out


def time_it(fn) -> float:
    return do_bench_cudagraph(fn, rep=10) * 1e-3 / COPIES  # seconds per product


def attention_rows(name: str, batch: int, position: int) -> list[str]:
    """Decode attention at one position: SDPA over the whole cache under the mask (the reference) against
    onebox's chunked kernel for several chunk sizes and warp counts, each over COPIES layers' caches; then
    the kernel with RoPE and the cache write folded in (timed only; tests/test_gpu.py checks it). cN/wW: chunk
    N, W warps, a merge kernel after; mN/wW: the chunks merge themselves (the last to finish, by an atomic ticket)."""
    from onebox.infer.kernels import decode_attention, rope_decode_attention
    from onebox.model import cached_attention

    c = PRESETS[name]
    shape = (batch, c.kv_heads, c.seq_len, c.head_size)
    caches = [
        (
            torch.randn(shape, device="cuda", dtype=torch.bfloat16),
            torch.randn(shape, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(COPIES)
    ]
    q = torch.randn(batch, 1, c.heads, c.head_size, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pos = torch.full((batch, 1), position, device="cuda")
    read = 2 * batch * c.kv_heads * (position + 1) * c.head_size * 2  # the bytes a step must read
    ref = cached_attention(q, *caches[0], pos).float()
    t = time_it(lambda: [cached_attention(q, k, v, pos) for k, v in caches])
    line = [f"{name:7} attention batch {batch} at {position}: {read / 1e6:5.2f} MB | sdpa {t * 1e6:6.2f} us"]
    best = None
    for chunk, warps in itertools.product((16, 32, 64, 128), (2, 4, 8)):
        got = decode_attention(q, *caches[0], pos, chunk=chunk, warps=warps).float()
        if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            print(f"  attention chunk {chunk} warps {warps}: WRONG")
            continue
        t = time_it(lambda: [decode_attention(q, k, v, pos, chunk=chunk, warps=warps) for k, v in caches])
        line.append(f"c{chunk}/w{warps} {t * 1e6:5.2f}")
        if best is None or t < best[0]:
            best = (t, chunk, warps)
    line.append(f"best chunk {best[1]} warps {best[2]}: {best[0] * 1e6:.2f} us ({read / best[0] / 1e12:.2f} TB/s)")
    counts = torch.zeros(
        batch, c.heads, dtype=torch.int32, device="cuda"
    )  # the chunks merge themselves (m): no merge kernel
    for chunk, warps in itertools.product((16, 32), (2, 4)):
        got = decode_attention(q, *caches[0], pos, chunk=chunk, warps=warps, counts=counts).float()
        ok = torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()) and not counts.any()
        t = time_it(
            lambda: [decode_attention(q, k, v, pos, chunk=chunk, warps=warps, counts=counts) for k, v in caches]
        )
        line.append(f"m{chunk}/w{warps} {t * 1e6:5.2f}{'' if ok else ' WRONG'}")
    # RoPE and the cache write folded in (rope_decode_attention): this step's q, k, v unrotated, written at `position`
    qkv = torch.randn(batch, 1, (c.heads + 2 * c.kv_heads) * c.head_size, device="cuda", dtype=torch.bfloat16)
    q_raw, k_new, v_new = (
        t.view(batch, 1, -1, c.head_size).transpose(1, 2) for t in qkv.split([c.dim, c.kv_dim, c.kv_dim], dim=-1)
    )
    cos, sin = (torch.randn(batch, 1, c.head_size, device="cuda") for _ in range(2))
    rope = [f"{name:7} rope attention batch {batch} at {position}"]
    for merged, chunk, warps in [(False, c, w) for c, w in itertools.product((16, 32, 64), (2, 4, 8))] + [
        (True, c, w) for c, w in ((16, 2), (16, 4), (32, 2), (32, 4))
    ]:
        t = time_it(
            lambda: [
                rope_decode_attention(
                    q_raw,
                    k_new,
                    v_new,
                    cos,
                    sin,
                    k,
                    v,
                    pos,
                    chunk=chunk,
                    warps=warps,
                    counts=counts if merged else None,
                )
                for k, v in caches
            ]
        )
        rope.append(f"{'m' if merged else 'c'}{chunk}/w{warps} {t * 1e6:5.2f}")
    return [" | ".join(line), " | ".join(rope)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="600m-A,3b-A")
    parser.add_argument("--designs", default="tile,rowsum,splitk")
    parser.add_argument(
        "--attention", action="store_true", help="time decode attention instead (batch 1 and 8 at position 255)"
    )
    args = parser.parse_args()
    if args.attention:
        rows = [row for name in args.presets.split(",") for batch in (1, 8) for row in attention_rows(name, batch, 255)]
        print("\n".join(rows))
        return
    torch.manual_seed(0)
    rows = []
    for name in args.presets.split(","):
        c = PRESETS[name]
        shapes = {
            "qkv": (c.dim + 2 * c.kv_dim, c.dim),
            "o": (c.dim, c.dim),
            "gate_up": (2 * c.hidden, c.dim),
            "down": (c.dim, c.hidden),
            "out": (c.vocab_size, c.dim),
        }
        for label, (n, k) in shapes.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            part = torch.empty(8, n, device="cuda", dtype=torch.float32)
            ref = x.float() @ ws[0].float().T
            nbytes = n * k * 2
            t = time_it(lambda: [F.linear(x, w) for w in ws])
            line = [
                f"{name:7} {label:8} {n:6}x{k:<6} {nbytes / 1e6:6.1f} MB | cublas {t * 1e6:6.2f} us {nbytes / t / 1e12:4.2f} TB/s"
            ]
            for design in args.designs.split(","):
                best = None
                for cfg in configs(design):
                    try:
                        run(design, cfg, x, ws[0], y, part)
                        torch.cuda.synchronize()
                        if not torch.allclose(y.float(), ref, rtol=2**-7, atol=1e-3 * ref.abs().max().item()):
                            print(f"  {design} {cfg}: WRONG (max err {(y.float() - ref).abs().max().item():.3g})")
                            continue
                        t = time_it(lambda: [run(design, cfg, x, w, y, part) for w in ws])
                    except Exception as err:  # out of resources for a config
                        print(f"  {design} {cfg}: {type(err).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best:
                    line.append(f"{design} {best[0] * 1e6:6.2f} us {nbytes / best[0] / 1e12:4.2f} TB/s {best[1]}")
            rows.append(" | ".join(line))
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
