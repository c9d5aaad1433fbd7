"""The image encoder's attention, softmax(scale * q k^T + B) v with SAM's decomposed
relative-position bias, in one implementation per kind of hardware.

B[q, k] = <q, Rh[q_row, k_row]> + <q, Rw[q_col, k_col]> (MViTv2's decomposed bias with the
unscaled q, as the official `add_decomposed_rel_pos`). Every implementation computes exactly
this function; they differ in how the work is laid out:

- "chunked": heads one after another (`lax.map`) and, within a head, query rows in chunks, so
  the score block stays cache-sized instead of streaming (heads x 4096 x 4096) floats through
  memory. The CPU path.
- "xla": all heads and queries in one batched einsum with the bias broadcast-added; XLA fuses
  the bias into the softmax, but the (B, heads, T, T) float32 scores exist in memory.
- "cudnn": the bias folded into q and k (below), then cuDNN's fused flash attention through
  `jax.nn.dot_product_attention`: no (T x T) array and no bias array in memory. bfloat16 or
  float16 only (cuDNN's limit).
- "pallas": the same fold, then JAX's bundled Pallas flash-attention kernel: Triton on GPU
  (`pallas.ops.gpu.attention.mha`), Mosaic on TPU (`pallas.ops.tpu.flash_attention`). Both
  have backward passes, so training uses them too.

The fold: B[q, k] = sum_i rel_h[q, i] [row(k) = i] + sum_j rel_w[q, j] [col(k) = j], a dot
product of (rel_h[q], rel_w[q]) with one-hot codes of the key's row and column. With
q' = [scale q, rel_h(q), rel_w(q)] and k' = [k, onehot(row(k)), onehot(col(k))], q'.k' is
scale q.k + B, so any standard attention kernel computes SAM's attention. It widens the
query-key head dim from C to C + H + W (64 -> 192 for SAM's global blocks, 64 -> 92 in
14x14 windows); the kernels want v as wide as k, so v is zero-padded and the output cut back.

`resolve_impl` picks the implementation per backend ("auto"); every one is tested against
"chunked" on CPU (the kernels in Pallas interpret mode).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from ..configs import ATTENTION_IMPLEMENTATIONS

# cuDNN's fused attention takes head dims that are multiples of 8 (and at most 256 on Hopper
# and later, 128 before); the Pallas kernels tile tokens in blocks of 128.
_CUDNN_DIM_MULTIPLE = 8
_PALLAS_TOKEN_BLOCK = 128
_TPU_LANES = 128  # the TPU kernel takes head dims up to 128, or multiples of 128
_FORCE_TPU_KERNEL = False  # see tpu_kernel_on_cpu


def get_rel_pos(size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative-position embeddings for equal query and key lengths: (size, size, C) with
    entry [i, j] = rel_pos[i - j + size - 1]."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table has {rel_pos.shape[0]} rows, but an axis "
                         f"of {size} tokens needs {2 * size - 1}")
    idx = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + (size - 1)
    return rel_pos[idx]


# ---- choosing an implementation ------------------------------------------------------------

def _cudnn_max_head_dim() -> int:
    try:
        capability = jax.devices("gpu")[0].compute_capability
    except (RuntimeError, AttributeError):
        return 0
    return 256 if tuple(int(x) for x in capability.split(".")) >= (9, 0) else 128


def folded_head_dim(head_dim: int, hw: Tuple[int, int], multiple: int = _CUDNN_DIM_MULTIPLE
                    ) -> int:
    """Query-key width after folding the bias in, padded to a multiple of `multiple` (cuDNN
    wants 8; the TPU kernel wants 128 above 128)."""
    width = head_dim + hw[0] + hw[1]
    return -(-width // multiple) * multiple


def resolve_impl(impl: str, dtype, head_dim: int, hw: Tuple[int, int],
                 backend: Optional[str] = None) -> str:
    """The implementation "auto" means on `backend` (default: JAX's default backend) for one
    attention layer; explicit names pass through after validation.

    CPU: "chunked" (cache-sized blocks). GPU: "cudnn" in bfloat16/float16 when the folded head
    dim fits cuDNN, else "xla" (float32 stays with XLA so `jax_default_matmul_precision`
    governs its matmuls, as on every other path). TPU: "pallas" (Mosaic flash attention)."""
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                         f"{impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "chunked"
    if backend == "tpu":
        return "pallas"
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend in ("gpu", "cuda") and low_precision and \
            folded_head_dim(head_dim, hw) <= _cudnn_max_head_dim():
        return "cudnn"
    return "xla"


# ---- the entry point -----------------------------------------------------------------------

def attention_with_rel_pos(q, k, v, rel_pos_h, rel_pos_w, hw: Tuple[int, int], *,
                           impl: str = "chunked", chunk_size: int = 0,
                           use_rel_pos: bool = True) -> jax.Array:
    """softmax(q*scale @ k^T + rel_h + rel_w) @ v for (B, T, heads, C) q, k, v over an H x W
    token grid (T = H*W); returns (B, T, heads, C) in the dtype of q.

    The matmuls run in the dtype of q, k, v (the compute dtype) with float32 accumulation,
    the softmax in float32. `impl` is a resolved name (see `resolve_impl`); `chunk_size` (query
    tokens per chunk) is used by "chunked" only."""
    rh = get_rel_pos(hw[0], rel_pos_h) if use_rel_pos else None
    rw = get_rel_pos(hw[1], rel_pos_w) if use_rel_pos else None
    if impl == "chunked":
        return _chunked(q, k, v, rh, rw, hw, chunk_size)
    if impl == "xla":
        return _all_heads(q, k, v, rh, rw, hw)
    if impl in ("cudnn", "pallas"):
        return _folded(q, k, v, rh, rw, hw, impl)
    raise ValueError(f"unknown attention implementation {impl!r}; resolve 'auto' first")


# ---- "chunked" and "xla": explicit scores ---------------------------------------------------

def _block_attention(q_rows, k_t, v, rh_rows, rw, scale):
    """One block of query rows against every key: q_rows (..., r, W, C) over an H x W key grid,
    k_t (..., C, H*W), v (..., H*W, C[+1]); rh_rows (r, H, C) and rw (W, W, C) or None.

    The softmax is normalized after the value matmul (dividing C outputs per query instead of
    H*W probabilities). When v carries an extra column of ones, that column of the product is
    the softmax denominator (below float32 it measured faster than a separate sum)."""
    f32 = jnp.float32
    c = q_rows.shape[-1]
    r, w = q_rows.shape[-3], q_rows.shape[-2]
    scores = jnp.einsum("...rwc,...ck->...rwk", q_rows * jnp.asarray(scale, q_rows.dtype), k_t,
                        preferred_element_type=f32)
    if rh_rows is not None:
        h = rh_rows.shape[1]
        rel_h = jnp.einsum("...rwc,rkc->...rwk", q_rows, rh_rows, preferred_element_type=f32)
        rel_w = jnp.einsum("...rwc,wkc->...rwk", q_rows, rw, preferred_element_type=f32)
        lead = scores.shape[:-3]
        scores = scores.reshape(lead + (r, w, h, w)) + rel_h[..., :, None] + rel_w[..., None, :]
        scores = scores.reshape(lead + (r, w, h * w))
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum("...rwk,...kc->...rwc", weights.astype(v.dtype), v,
                     preferred_element_type=f32)
    if v.shape[-1] > c:  # the appended column of ones summed the weights
        return out[..., :c] / out[..., c:]
    return out / weights.sum(-1, keepdims=True)


def _with_ones_column(v):
    """Below float32, a column of ones appended to v makes the value matmul return the softmax
    denominator too; the sum then uses the rounded weights it divides."""
    if v.dtype == jnp.float32:
        return v
    return jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)


def _chunked(q, k, v, rh, rw, hw, chunk_size):
    h, w = hw
    b, tokens, n, c = q.shape
    scale = c ** -0.5
    rh = None if rh is None else rh.astype(q.dtype)
    rw = None if rw is None else rw.astype(q.dtype)
    rows = max(1, min(h, chunk_size // w)) if chunk_size > 0 else h
    if h % rows:
        rows = h

    def head_attention(args):
        q_head, k_head, v_head = args  # (B, T, C)
        q_head = q_head.reshape(b, h, w, c)
        k_t = k_head.transpose(0, 2, 1)  # once per head, not once per chunk
        v_head = _with_ones_column(v_head)
        if rows == h:
            return _block_attention(q_head, k_t, v_head, rh, rw, scale)
        chunks = q_head.reshape(b, h // rows, rows, w, c).transpose(1, 0, 2, 3, 4)

        def chunk_attention(a):
            rh_rows = None if rh is None else jax.lax.dynamic_slice_in_dim(rh, a[1], rows, 0)
            return _block_attention(a[0], k_t, v_head, rh_rows, rw, scale)

        out = jax.lax.map(chunk_attention, (chunks, jnp.arange(0, h, rows)))
        return out.transpose(1, 0, 2, 3, 4).reshape(b, h, w, c)

    heads_first = lambda x: x.transpose(2, 0, 1, 3)  # noqa: E731
    out = jax.lax.map(head_attention, (heads_first(q), heads_first(k), heads_first(v)))
    return out.reshape(n, b, tokens, c).transpose(1, 2, 0, 3).astype(q.dtype)


def _all_heads(q, k, v, rh, rw, hw):
    h, w = hw
    b, tokens, n, c = q.shape
    rh = None if rh is None else rh.astype(q.dtype)
    rw = None if rw is None else rw.astype(q.dtype)
    q_grid = q.transpose(0, 2, 1, 3).reshape(b, n, h, w, c)
    k_t = k.transpose(0, 2, 3, 1)  # (B, N, C, T)
    v_heads = _with_ones_column(v.transpose(0, 2, 1, 3))
    out = _block_attention(q_grid, k_t, v_heads, rh, rw, c ** -0.5)
    return out.reshape(b, n, tokens, c).transpose(0, 2, 1, 3).astype(q.dtype)


# ---- "cudnn" and "pallas": the bias folded into q and k ----------------------------------

def fold_rel_pos(q, k, v, rh, rw, hw, multiple: int = _CUDNN_DIM_MULTIPLE):
    """(q', k', v') of width `folded_head_dim` with q'.k' = scale q.k + B (see the module
    docstring) and v zero-padded to that width; inputs and outputs are (B, T, heads, .).

    The bias terms are computed at float32 accumulation and stored in the compute dtype; the
    one-hot codes are exact in any dtype."""
    h, w = hw
    b, tokens, n, c = q.shape
    scale = c ** -0.5
    width = folded_head_dim(c, hw if rh is not None else (0, 0), multiple)
    parts_q = [q * jnp.asarray(scale, q.dtype)]
    parts_k = [k]
    if rh is not None:
        q_grid = q.reshape(b, h, w, n, c)
        rel_h = jnp.einsum("byxnc,ykc->byxnk", q_grid, rh.astype(q.dtype),
                           preferred_element_type=jnp.float32)
        rel_w = jnp.einsum("byxnc,xkc->byxnk", q_grid, rw.astype(q.dtype),
                           preferred_element_type=jnp.float32)
        parts_q += [rel_h.reshape(b, tokens, n, h).astype(q.dtype),
                    rel_w.reshape(b, tokens, n, w).astype(q.dtype)]
        rows = jnp.repeat(jnp.eye(h, dtype=k.dtype), w, axis=0)  # (T, H): key t is in row t//W
        cols = jnp.tile(jnp.eye(w, dtype=k.dtype), (h, 1))  # (T, W): ... and column t%W
        codes = jnp.broadcast_to(jnp.concatenate([rows, cols], -1)[None, :, None, :],
                                 (b, tokens, n, h + w))
        parts_k.append(codes)
    used = sum(p.shape[-1] for p in parts_q)
    pad = lambda x, extra: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))  # noqa: E731
    q_f = pad(jnp.concatenate(parts_q, -1), width - used)
    k_f = pad(jnp.concatenate(parts_k, -1), width - used)
    return q_f, k_f, pad(v, width - c)


def _folded(q, k, v, rh, rw, hw, impl):
    c = q.shape[-1]
    multiple = _CUDNN_DIM_MULTIPLE
    if impl == "pallas" and _use_tpu_kernel() and \
            folded_head_dim(c, hw if rh is not None else (0, 0)) > _TPU_LANES:
        multiple = _TPU_LANES  # costs 256 - 192 zero channels in SAM's global blocks
    q_f, k_f, v_f = fold_rel_pos(q, k, v, rh, rw, hw, multiple)
    if impl == "cudnn":
        out = jax.nn.dot_product_attention(q_f, k_f, v_f, scale=1.0, implementation="cudnn")
    else:
        out = _pallas_flash(q_f, k_f, v_f)
    return out[..., :c].astype(q.dtype)


def _pallas_flash(q, k, v, interpret: Optional[bool] = None):
    """Flash attention (scale 1, no mask) with JAX's bundled Pallas kernels on (B, T, N, D)
    inputs. Tokens are padded to the kernels' block of 128 with a second segment, so padded
    keys are invisible to real queries (and padded queries, cut off after, see only pads)."""
    b, tokens, n, d = q.shape
    padded = -(-tokens // _PALLAS_TOKEN_BLOCK) * _PALLAS_TOKEN_BLOCK
    segments = None
    if padded != tokens:
        extra = ((0, 0), (0, padded - tokens), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, extra) for x in (q, k, v))
        segments = jnp.broadcast_to((jnp.arange(padded) >= tokens).astype(jnp.int32),
                                    (b, padded))
    if _use_tpu_kernel():
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
        ids = None if segments is None else tpu_flash.SegmentIds(segments, segments)
        heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        out = tpu_flash.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                                        segment_ids=ids, sm_scale=1.0)
        out = heads_first(out)
    else:
        from jax.experimental.pallas.ops.gpu import attention as gpu_flash
        interpret = jax.default_backend() == "cpu" if interpret is None else interpret
        out = gpu_flash.mha(q, k, v, segments, sm_scale=1.0, interpret=interpret)
    return out[:, :tokens]


def _use_tpu_kernel() -> bool:
    return jax.default_backend() == "tpu" or _FORCE_TPU_KERNEL


@contextlib.contextmanager
def tpu_kernel_on_cpu():
    """Within this context the "pallas" path traces the TPU (Mosaic) kernel instead of the
    Triton one on a non-TPU backend: tests run it on CPU under
    `pallas.tpu.force_tpu_interpret_mode()`. Trace-time only; jit caches are not keyed on it."""
    global _FORCE_TPU_KERNEL
    previous, _FORCE_TPU_KERNEL = _FORCE_TPU_KERNEL, True
    try:
        yield
    finally:
        _FORCE_TPU_KERNEL = previous
