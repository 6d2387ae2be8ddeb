"""What a CUDA GPU would do, applied to a step traced on `meta` tensors.

The planner runs the real `train_step` on meta tensors (shapes and dtypes, no data). Three
things a GPU does differently from any CPU-side tracing, and which change memory a lot:

- Autocast. CUDA autocast runs group_norm, layer_norm, softmax, interpolation, pow, losses ...
  in fp32 (keeping fp32 outputs and bf16 copies for the next conv), while CPU autocast keeps
  them in bf16; a MONAI UNet traced with CPU autocast needs about half the memory it needs on
  a GPU. `torch.autocast` has no meta device and refuses `cuda` on a CPU-only build, so this
  module applies CUDA's op policy itself (the op lists of PyTorch's autocast reference for
  CUDA), above autograd as the real autocast does: the cast copies are graph nodes and the
  ops save the cast copies for backward. Casts of parameters are cached for the autocast
  region, as `torch.autocast` does.
- Attention. `scaled_dot_product_attention` on a GPU runs the flash kernel (bf16/fp16) or the
  memory-efficient one (fp32): memory O(N), while traced elsewhere it takes the math path
  that materialises the N x N matrix. The call is routed to the kernel the GPU would choose.
- Host reads. `float(loss)` needs data a meta tensor does not have; it returns nan.

Limits: functions implemented in Python inside torch (e.g. `F.multi_head_attention_forward`)
are seen as one call; the policy is applied to the ops listed here, which cover what the
voxgen model families call.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from voxgen.precision import MIXED_DTYPES, autocast_policy

T = torch.Tensor

# CUDA autocast's "lower precision" list (PyTorch autocast op reference, CUDA section).
_LOWER = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.convolution,
    F.linear,
    F.prelu,
    torch.addmm,
    torch.addmv,
    torch.addr,
    torch.matmul,
    torch.einsum,
    torch.mm,
    torch.mv,
    torch.addbmm,
    torch.baddbmm,
    torch.bmm,
    torch.chain_matmul,
    torch.linalg.multi_dot,
    T.matmul,
    T.__matmul__,
    T.__rmatmul__,
    T.mm,
    T.mv,
    T.bmm,
    T.baddbmm,
    T.addmm,
    T.addbmm,
    T.addmv,
    T.addr,
    F.scaled_dot_product_attention,
}
# CUDA autocast's "float32" list (ops that run in fp32 whatever their input dtype).
_FP32 = {
    F.group_norm,
    F.layer_norm,
    torch.group_norm,
    torch.layer_norm,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    T.softmax,
    T.log_softmax,
    F.interpolate,
    F.upsample,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.kl_div,
    F.nll_loss,
    F.cross_entropy,
    F.binary_cross_entropy_with_logits,
    F.cosine_similarity,
    F.softplus,
    torch.exp,
    torch.log,
    torch.log2,
    torch.log10,
    torch.log1p,
    torch.expm1,
    torch.pow,
    torch.reciprocal,
    torch.rsqrt,
    torch.acos,
    torch.asin,
    torch.cosh,
    torch.sinh,
    torch.tan,
    torch.erfinv,
    torch.norm,
    torch.cumsum,
    torch.cumprod,
    torch.logsumexp,
    torch.cdist,
    torch.dist,
    T.exp,
    T.log,
    T.log2,
    T.log10,
    T.log1p,
    T.expm1,
    T.pow,
    T.__pow__,
    T.reciprocal,
    T.rsqrt,
    T.norm,
    T.cumsum,
    T.cumprod,
    T.logsumexp,
}
# Ops whose float inputs are promoted to the widest float dtype among them.
_PROMOTE = {
    torch.cat,
    torch.stack,
    torch.addcmul,
    torch.addcdiv,
    torch.atan2,
    torch.cross,
    torch.dot,
    torch.tensordot,
    torch.index_put,
    torch.scatter_add,
    torch.index_copy,
    F.grid_sample,
    F.bilinear,
}

_LOW_DTYPES = (torch.float16, torch.bfloat16)


class _AutocastState(threading.local):
    def __init__(self):
        self.dtype: torch.dtype | None = None
        self.cache: dict[int, torch.Tensor] = {}
        # Autocast dtype of the step's forward, re-entered when checkpointed blocks are recomputed
        # in backward (torch.utils.checkpoint restores the forward's autocast state on a GPU).
        self.forward_dtype: torch.dtype | None = None
        self.backward = False


_STATE = _AutocastState()


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype):
    """The autocast region of a step traced on meta tensors (see `emulated_autocast_policy`)."""
    previous, cache = _STATE.dtype, _STATE.cache
    _STATE.dtype, _STATE.forward_dtype, _STATE.cache = dtype, dtype, {}
    try:
        yield
    finally:
        # Leaving the region frees the cached weight casts, as torch.autocast's cache clear does.
        _STATE.dtype, _STATE.cache = previous, cache


def emulated_autocast_policy(precision: str):
    """The planner's precision policy (`voxgen.precision`): CUDA's casting rules for meta tensors."""
    if precision in MIXED_DTYPES:
        return lambda device: cuda_autocast(MIXED_DTYPES[precision])
    return autocast_policy(precision)


def set_backward(flag: bool) -> None:
    """Told by the allocation tracker while the traced step is in its backward pass."""
    _STATE.backward = flag


def _in_backward() -> bool:
    return _STATE.backward or torch._C._current_graph_task_id() != -1


def _active_dtype() -> torch.dtype | None:
    if _STATE.dtype is not None:
        return _STATE.dtype
    # Python code run during backward is a checkpoint recompute: torch.utils.checkpoint re-enters
    # the forward's autocast state, and every voxgen forward runs in one autocast region.
    return _STATE.forward_dtype if _in_backward() else None


def _cast(x, dtype: torch.dtype, cache: dict | None):
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point() or x.dtype in (torch.float64, dtype):
            return x
        # Like autocast, cache casts of parameters (leaves that need grad) for the region.
        cacheable = cache is not None and x.is_leaf and x.requires_grad and torch.is_grad_enabled()
        if cacheable and id(x) in cache:
            return cache[id(x)]
        y = x.to(dtype)
        if cacheable:
            cache[id(x)] = y
        return y
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype, cache) for v in x)
    return x


def _float_dtypes(x, out: set) -> set:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        out.add(x.dtype)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _float_dtypes(v, out)
    return out


def _gpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The fused kernel a GPU picks for SDPA: flash for half precision, memory-efficient otherwise."""
    head_dim = query.shape[-1]
    if attn_mask is None and query.dtype in _LOW_DTYPES and head_dim <= 256 and not enable_gqa:
        out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)
        return out[0]
    if not enable_gqa:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
        )
        return out[0]
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa=enable_gqa)


class CudaSemantics(TorchFunctionMode):
    """Torch-function mode active for a whole traced step: autocast policy, SDPA kernel, host reads.

    `loss.backward()` is itself a torch function, and a mode is switched off while its own
    handler runs, so checkpoint recomputes (Python run from autograd's unpack hook) would see
    none of this: `voxgen.models.blocks.enable_checkpointing` re-enters the forward's
    torch-function modes around each recompute, and `_active_dtype` gives it the forward's
    autocast dtype, as torch.utils.checkpoint restores autocast on a GPU.
    """

    def __init__(self):
        super().__init__()
        self._depth = 0  # > 1 while entered again around a backward

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:
            _STATE.forward_dtype, _STATE.backward = None, False  # only this trace's regions count
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            _STATE.forward_dtype, _STATE.backward = None, False
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (T.__float__, T.item):
            return float("nan")
        dtype = _active_dtype()
        if dtype is not None:
            cache = _STATE.cache if _STATE.dtype is not None else None
            if func in _LOWER:
                args, kwargs = _cast(args, dtype, cache), {k: _cast(v, dtype, cache) for k, v in kwargs.items()}
            elif func in _FP32:
                args = _cast(args, torch.float32, None)
                kwargs = {k: _cast(v, torch.float32, None) for k, v in kwargs.items()}
            elif func in _PROMOTE:
                found = _float_dtypes(args, set())
                if len(found) > 1:
                    widest = max(found, key=lambda d: torch.finfo(d).bits)
                    args = _cast(args, widest, None)
        if func is F.scaled_dot_product_attention:
            return _gpu_sdpa(*args, **kwargs)
        return func(*args, **kwargs)
