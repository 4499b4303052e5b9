"""The Triton kernels of decode attention (flash-decoding): each program one (row, head, chunk of the
cache) with an online softmax, RoPE and the cache write optionally folded in, and the merge of the
chunks (by the last program to finish, or by a second kernel). Launched by `attention.py`."""

from onebox.infer.kernels.launch import tl, triton

if triton is not None:

    @triton.jit
    def _rope_row(ptr, dims, partner, sign, cos, sin):
        """One head's row rotated by its position's angles, rounded as `onebox.model.apply_rope` rounds in
        the row's dtype (each product, then the sum): x * cos + rotate_half(x) * sin."""
        dtype = ptr.dtype.element_ty
        x = tl.load(ptr + dims).to(tl.float32)
        other = tl.load(ptr + partner).to(tl.float32) * sign
        return ((x * cos).to(dtype).to(tl.float32) + (other * sin).to(dtype).to(tl.float32)).to(dtype)

    @triton.jit
    def _attention_chunk_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        spos_b,
        part_ptr,
        stat_ptr,
        HEADS,
        GROUP,
        CHUNKS,
        scale,
        sq_b,
        sq_h,
        sk_b,
        sk_h,
        sk_s,
        sv_b,
        sv_h,
        sv_s,
        kn_ptr,
        vn_ptr,
        cos_ptr,
        sin_ptr,
        skn_b,
        skn_h,
        svn_b,
        svn_h,
        scos_b,
        count_ptr,
        o_ptr,
        so_b,
        so_h,
        D: tl.constexpr,
        CHUNK: tl.constexpr,
        ROPE: tl.constexpr,
        EARLY_V: tl.constexpr,
        MERGE: tl.constexpr,
        MERGE_BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        row_head = tl.program_id(0)  # row * HEADS + head
        chunk = tl.program_id(1)
        row, head = row_head // HEADS, row_head % HEADS
        kv_head = head // GROUP
        # With PDL everything up to `gdc_wait` runs while the kernel before still does: it reads only what no kernel of
        # this step writes before it (the cache's earlier positions; input_pos, which must come from outside the step)
        length = tl.load(pos_ptr + row * spos_b).to(tl.int32) + 1
        out = row_head * CHUNKS + chunk
        dims = tl.arange(0, D)
        start = chunk * CHUNK
        positions = start + tl.arange(0, CHUNK)
        valid = positions < length  # none past this row's position: those programs load nothing
        last = length - 1  # this step's position: with ROPE its slot is not read from the cache (this step's k, v are)
        cached = valid
        if ROPE:
            cached = valid & (positions != last)
        k = tl.load(
            k_ptr + row * sk_b + kv_head * sk_h + positions[:, None] * sk_s + dims[None, :],
            mask=cached[:, None],
            other=0.0,
        ).to(tl.float32)
        if EARLY_V:  # small tiles: V's load in flight with K's (one memory round trip instead of two)
            v = tl.load(
                v_ptr + row * sv_b + kv_head * sv_h + positions[:, None] * sv_s + dims[None, :],
                mask=cached[:, None],
                other=0.0,
            ).to(tl.float32)
        if PDL:  # q (and this step's k, v) come from the kernel before; every store below lands after it has ended
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch (it waits for this one's end)
        if start < length:
            if (
                ROPE
            ):  # q, and this step's k, still unrotated: rotate them here; this step's k and v go into the cache here
                dtype = q_ptr.dtype.element_ty
                partner = (dims + D // 2) % D
                sign = tl.where(dims < D // 2, -1.0, 1.0)
                cos = tl.load(cos_ptr + row * scos_b + dims).to(dtype).to(tl.float32)
                sin = tl.load(sin_ptr + row * scos_b + dims).to(dtype).to(tl.float32)
                q = _rope_row(q_ptr + row * sq_b + head * sq_h, dims, partner, sign, cos, sin).to(tl.float32) * scale
                if last < start + CHUNK:  # the chunk that holds this step's position: k from this step, rotated
                    k_new = _rope_row(kn_ptr + row * skn_b + kv_head * skn_h, dims, partner, sign, cos, sin)
                    k = tl.where((positions == last)[:, None], k_new.to(tl.float32)[None, :], k)
                    if (
                        head % GROUP == 0
                    ):  # one program per key/value head writes this step's k (and v, below) into the cache
                        tl.store(
                            k_ptr + row * sk_b + kv_head * sk_h + last * sk_s + dims, k_new.to(k_ptr.dtype.element_ty)
                        )
            else:
                q = tl.load(q_ptr + row * sq_b + head * sq_h + dims).to(tl.float32) * scale
            scores = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
            top = tl.max(scores, axis=0)
            weights = tl.exp(scores - top)
            if (
                not EARLY_V
            ):  # large tiles: V after K's scores (both at once would double the registers: 195 at chunk 64, 4 warps)
                v = tl.load(
                    v_ptr + row * sv_b + kv_head * sv_h + positions[:, None] * sv_s + dims[None, :],
                    mask=cached[:, None],
                    other=0.0,
                ).to(tl.float32)
            if ROPE:
                if last < start + CHUNK:
                    v_new = tl.load(vn_ptr + row * svn_b + kv_head * svn_h + dims)
                    v = tl.where((positions == last)[:, None], v_new.to(tl.float32)[None, :], v)
                    if head % GROUP == 0:  # (no program reads the cache at this position: see `cached`)
                        tl.store(
                            v_ptr + row * sv_b + kv_head * sv_h + last * sv_s + dims, v_new.to(v_ptr.dtype.element_ty)
                        )
            tl.store(part_ptr + out * D + dims, tl.sum(weights[:, None] * v, axis=0))
            tl.store(stat_ptr + out * 2, top)
            tl.store(stat_ptr + out * 2 + 1, tl.sum(weights, axis=0))
        else:  # past this row's position: weighs nothing in the merge
            tl.store(stat_ptr + out * 2, float("-inf"))
            tl.store(stat_ptr + out * 2 + 1, 0.0)
        if MERGE:  # the last of this (row, head)'s programs to finish merges them all: no second kernel
            tl.debug_barrier()  # every thread's stores above come before the ticket (released with it)
            ticket = tl.atomic_add(count_ptr + row_head, 1, sem="acq_rel")
            if ticket == CHUNKS - 1:
                tl.store(count_ptr + row_head, 0)  # every program has taken its ticket: zero for the next step
                _merge_row(part_ptr, stat_ptr, o_ptr, row_head, HEADS, CHUNKS, so_b, so_h, D, MERGE_BLOCK)

    @triton.jit
    def _merge_row(
        part_ptr,
        stat_ptr,
        o_ptr,
        row_head,
        HEADS,
        CHUNKS,
        so_b,
        so_h,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One (row, head)'s chunk results merged (their softmax rescaled to one maximum), BLOCK chunks at a time;
        read from L2 (.cg): other programs wrote them during this kernel."""
        row, head = row_head // HEADS, row_head % HEADS
        dims = tl.arange(0, D)
        top = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)
        total = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
        acc = tl.zeros((D,), tl.float32)
        for first in range(0, CHUNKS, BLOCK):
            chunks = first + tl.arange(0, BLOCK)
            live = chunks < CHUNKS
            tops = tl.load(
                stat_ptr + (row_head * CHUNKS + chunks) * 2, mask=live, other=float("-inf"), cache_modifier=".cg"
            )
            sums = tl.load(stat_ptr + (row_head * CHUNKS + chunks) * 2 + 1, mask=live, other=0.0, cache_modifier=".cg")
            filled = tops > float("-inf")
            parts = tl.load(
                part_ptr + (row_head * CHUNKS + chunks)[:, None] * D + dims[None, :],
                mask=filled[:, None],
                other=0.0,
                cache_modifier=".cg",
            )
            new_top = tl.maximum(
                top, tl.max(tops, axis=0)
            )  # the first block holds chunk 0, which holds position 0: finite from here
            scale = tl.where(filled, tl.exp(tops - new_top), 0.0)
            carry = tl.exp(top - new_top)  # 0 on the first block
            acc = acc * carry + tl.sum(parts * scale[:, None], axis=0)
            total = total * carry + tl.sum(sums * scale, axis=0)
            top = new_top
        tl.store(o_ptr + row * so_b + head * so_h + dims, (acc / total).to(o_ptr.dtype.element_ty))

    @triton.jit
    def _attention_merge_kernel(
        part_ptr,
        stat_ptr,
        o_ptr,
        HEADS,
        CHUNKS,
        so_b,
        so_h,
        D: tl.constexpr,
        MERGE_BLOCK: tl.constexpr,
    ):
        _merge_row(part_ptr, stat_ptr, o_ptr, tl.program_id(0), HEADS, CHUNKS, so_b, so_h, D, MERGE_BLOCK)
