r"""PyTorch layers and utilities of nsiter: network deconvolution as drop-in ``nn.Module``\ s.

``import nsiter`` never imports torch; ``import nsiter.torch`` does.  The public nsiter
functions (:func:`nsiter.im2col`, :func:`nsiter.patch_covariance`, :func:`nsiter.inv_sqrtm`,
...) accept tensors already; this module adds what only makes sense in torch:

* :class:`Deconv2d` — whitening (Ye et al. 2020, Algorithm 1 and §4.5) followed by a
  convolution, usable in place of ``nn.Conv2d`` + ``nn.BatchNorm2d`` (the reference ``FastDeconv``);
* :class:`ChannelDeconv` — channel-only whitening of a feature map or of features (the
  reference ``ChannelDeconv``);
* :class:`Delinear` — whitening followed by a fully connected layer (the reference ``Delinear``);
* :func:`convert_to_deconv` — the paper's recipe applied to a model: batch norms removed,
  deconvolution before every convolution and fully connected layer;
* :func:`convert_sync_deconv` — statistics of the global batch in multi-process training
  (``torch.distributed``), as ``SyncBatchNorm`` does for batch norm;
* :class:`PatchStatistics` — the streaming patch covariance with the heavy work on the
  tensor's device;
* :func:`set_allow_tf32` / :func:`allow_tf32` — opt in to TF32 for nsiter's CUDA matrix
  products (off by default: it costs three decimal digits of the whitening);
  :func:`set_cuda_graphs` — switch the CUDA-graph path of small Newton–Schulz problems.

The three layers share one statistics path (:func:`_moments`, :func:`_whiten`): the sample rows are a
strided view of one tensor, gathered once into a float32-or-wider buffer, centred in place and
multiplied once (``Cov = X_c^T X_c / n``; the backward is the single product ``X_c (G + G^T) / n``
scattered back along the same view), then ``D = (Cov + eps I)^{-1/2}`` by the reference code's
coupled Newton–Schulz steps or any :func:`nsiter.inv_sqrtm` method.

Example
-------
>>> import torch, nsiter.torch as nt
>>> layer = nt.Deconv2d(3, 8, 3, padding=1)           # replaces Conv2d(3, 8, 3, padding=1) + BN
>>> y = layer(torch.randn(4, 3, 16, 16))              # train mode: batch statistics
>>> y.shape
torch.Size([4, 8, 16, 16])
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._backend import backend
from ._conventions import geometry
from ._torch import allow_tf32, matmul_precision, set_allow_tf32, set_cuda_graphs
from ._validation import as_float_array, as_pair, check_nonnegative_float, check_option, check_positive_int
from ._warnings import NsiterWarning, warn
from .covariance import GROUPINGS
from .covariance import PatchStatistics as _NumpyPatchStatistics
from .newton_schulz import METHODS, _run_fixed, inv_sqrtm

__all__ = ["Deconv2d", "ChannelDeconv", "Delinear", "convert_to_deconv", "convert_sync_deconv", "PatchStatistics", "set_allow_tf32",
           "allow_tf32", "set_cuda_graphs", "GROUPINGS", "SAMPLINGS", "COVARIANCES"]

SAMPLINGS = ("grid", "reference")
"""Patch sampling of :class:`Deconv2d`: ``"grid"`` — patches on the grid subsampled by
``sampling_stride * stride`` for every kernel size; ``"reference"`` — the same, except that 1x1
kernels take every ``(sampling_stride * stride)^2``-th pixel of the flattened ``(N, H, W)`` batch,
as the reference ``FastDeconv`` does."""

COVARIANCES = ("uncentred", "centred")
"""Second moment whitened by :class:`ChannelDeconv`: ``"uncentred"`` — ``X^T X / n`` of the
subsampled channels before the mean is removed, as the reference code computes it;
``"centred"`` — the covariance ``(X - mu)^T (X - mu) / n``."""


# ---- the one statistics path --------------------------------------------------------------

def _newton_schulz(cov: torch.Tensor, n_iter: int) -> torch.Tensor:
    """The reference code's ``isqrt_newton_schulz_autograd(_batch)`` on ``(B, n, n)``.

    ``c = ||Cov||_F`` in the working dtype, ``Y_0 = Cov / c``, ``n_iter`` coupled steps
    (Higham 2008, Eq. 6.35), ``D = Z / sqrt(c)``; differentiable end to end, no host sync.
    """
    c = torch.linalg.matrix_norm(cov)[:, None, None]
    Z, _ = _run_fixed(backend(cov), cov / c, n_iter, None, want_y=False)
    return Z / torch.sqrt(c)


def _inv_sqrt(cov: torch.Tensor, method: str, n_iter: int, tol) -> torch.Tensor:
    """``(Cov)^{-1/2}``: the reference iteration (``"coupled"``, fixed count) or :func:`nsiter.inv_sqrtm`."""
    if method == "coupled" and tol is None:
        return _newton_schulz(cov, n_iter)
    return inv_sqrtm(cov, method=method, n_iter=n_iter, tol=tol)


class _Rows:
    """Whitening samples as a strided view of one source tensor, and the adjoint of gathering them.

    ``view(t)`` maps a tensor shaped like the source (or, with ``pad``, like its padded
    channels-last copy) to a view ``(K, *sample dims, *feature dims)`` (``n_sample_dims`` of
    them), ``K`` independent blocks.  ``pieces``: index tuples cutting the view into parts
    without repeated elements (one part, or one per kernel tap when patches overlap), so that
    the scatter adds every element once.  ``covers``: the view reaches every element that the
    gradient keeps (no zero fill needed).  ``columns`` / ``stack``: a column permutation applied
    after the gather and the number of row blocks it stacks (the reference grouping, whose
    blocks interleave the im2col columns).  ``pad``: gather from ``(N, H + 2ph, W + 2pw, C)``
    zero-padded channels-last memory made from an ``(N, C, H, W)`` source (returned, so that
    the convolution reads the same copy).
    """

    __slots__ = ("view", "n_sample_dims", "pieces", "covers", "columns", "stack", "pad")

    def __init__(self, view, n_sample_dims, pieces=((),), covers=True, columns=None, stack=1, pad=None):
        self.view, self.n_sample_dims, self.pieces, self.covers = view, n_sample_dims, pieces, covers
        self.columns, self.stack, self.pad = columns, stack, pad

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The padded channels-last copy: borders zeroed, interior copied once."""
        ph, pw = self.pad
        N, C, H, W = x.shape
        xs = x.new_empty((N, H + 2 * ph, W + 2 * pw, C))
        if ph:
            xs[:, :ph].zero_()
            xs[:, ph + H:].zero_()
        if pw:
            xs[:, ph:ph + H, :pw].zero_()
            xs[:, ph:ph + H, pw + W:].zero_()
        xs[:, ph:ph + H, pw:pw + W].copy_(x.permute(0, 2, 3, 1))
        return xs

    def gather(self, base: torch.Tensor, dtype) -> torch.Tensor:
        """One copy into a fresh ``(K, n, F)`` buffer of ``dtype``."""
        v = self.view(base)
        ns = self.n_sample_dims
        K, n, f = v.shape[0], math.prod(v.shape[1:1 + ns]), math.prod(v.shape[1 + ns:])
        X = torch.empty((K, n, f), dtype=dtype, device=base.device)
        X.view(v.shape).copy_(v)
        if self.columns is not None:
            X = X.index_select(2, self.columns).view(K, n * self.stack, f // self.stack)
        return X

    def scatter(self, dX: torch.Tensor, shape, dtype, into=None) -> torch.Tensor:
        """The adjoint of :meth:`gather`: ``dX (K, n, F)`` added into ``into`` (a contiguous tensor shaped
        like the base, modified in place) or into a fresh one."""
        single = len(self.pieces) == 1
        d = into
        if d is None:
            d = (torch.empty if single and self.covers else torch.zeros)(shape, dtype=dtype, device=dX.device)
        v = self.view(d)
        if self.columns is not None:
            dX = dX.reshape(v.shape[0], -1, self.columns.numel())
            dX = torch.empty_like(dX).index_copy_(2, self.columns, dX)
        dXv = dX.view(v.shape)
        if single and into is None:
            v[self.pieces[0]].copy_(dXv[self.pieces[0]])
        else:
            for p in self.pieces:
                v[p].add_(dXv[p])
        return d


def _gram(X: torch.Tensor) -> torch.Tensor:
    """``X^T X`` of ``(K, n, F)``, exactly symmetric; from ``F = 256`` on as three products of the
    column halves (3/4 of the flops of the full product)."""
    K, n, f = X.shape
    if f < 256:
        M = torch.matmul(X.transpose(1, 2), X)
        return (M + M.transpose(1, 2)).mul_(0.5)
    h = f // 2
    A, B = X[:, :, :h], X[:, :, h:]
    M = X.new_empty((K, f, f))
    for part, Y in ((slice(0, h), A), (slice(h, f), B)):
        Mb = torch.matmul(Y.transpose(1, 2), Y)
        M[:, part, part] = (Mb + Mb.transpose(1, 2)).mul_(0.5)
    M[:, :h, h:] = torch.matmul(A.transpose(1, 2), B)
    M[:, h:, :h] = M[:, :h, h:].transpose(1, 2)
    return M


class _CentredMoments(torch.autograd.Function):
    """``(mean (K, F), Cov = X_c^T X_c / n (K, F, F), n)`` of the rows ``X (K, n, F)`` of a source.

    Forward: (with ``rows.pad``: the padded channels-last copy, also returned), one gather, the
    mean, an in-place centring and the symmetric product.  Backward: ``dX = X_c (G + G^T) / n +
    1 g_mu^T / n`` (the centring term vanishes because the columns of ``X_c`` sum to zero),
    scattered back along the view; with ``pad``, added to the gradient of the copy and
    transposed back to the source's layout in one pass.  One product and two passes, where
    autograd through the reference code's ``unfold``, ``mean`` and ``addmm`` takes two products
    and several passes.

    With a process ``group`` the statistics are those of the union of every rank's rows, as
    :class:`torch.nn.SyncBatchNorm` makes them: one all-reduce of ``(sum_r x_r, n)`` (float64)
    gives the global mean, every rank centres its rows on it, and one all-reduce of the centred
    cross-products ``X_c^T X_c`` gives the global ``M2`` (``F^2 + F + 1`` numbers per block, no
    ``E[xx^T] - mu mu^T`` cancellation); ``n`` is then the global count (a tensor).  The backward
    all-reduces ``(g_mu, G)``, the gradient of the global loss (the sum of the ranks' losses) with
    respect to the shared statistics, and the formula above holds with the global ``n``: the
    centring term vanishes over the union of the rows, which is where the columns sum to zero.
    """

    @staticmethod
    def forward(ctx, src, rows, dtype, group):
        base = src if rows.pad is None else rows.prepare(src)
        X = rows.gather(base, dtype)
        n = X.shape[1]
        if group is None:
            mean = X.mean(dim=1)
        else:
            K, f = X.shape[0], X.shape[2]
            sums = torch.cat([X.sum(dim=1, dtype=torch.float64).reshape(-1), X.new_full((1,), n, dtype=torch.float64)])
            dist.all_reduce(sums, group=group)
            n = sums[-1]
            mean = (sums[:-1] / n).to(dtype).reshape(K, f)
        X.sub_(mean[:, None])
        cov = _gram(X)
        if group is not None:
            dist.all_reduce(cov, group=group)
        cov.div_(n)
        ctx.save_for_backward(X)
        ctx.rows, ctx.meta, ctx.n, ctx.group = rows, (base.shape, base.dtype), n, group
        if rows.pad is None:
            return mean, cov, n
        ctx.memory_format = _memory_format(src)
        return mean, cov, n, base

    @staticmethod
    @once_differentiable
    def backward(ctx, gmean, gcov, gn=None, gbase=None):
        X, = ctx.saved_tensors
        n = ctx.n
        gmean, gcov = gmean.to(X.dtype), gcov.to(X.dtype)
        if ctx.group is not None:
            flat = torch.cat([gmean.reshape(-1), gcov.reshape(-1)])
            dist.all_reduce(flat, group=ctx.group)
            gmean, gcov = flat[:gmean.numel()].view(gmean.shape), flat[gmean.numel():].view(gcov.shape)
        dX = torch.matmul(X, gcov + gcov.transpose(1, 2)).div_(n)
        dX.add_(gmean[:, None] / n)
        rows = ctx.rows
        if rows.pad is None:
            return rows.scatter(dX, *ctx.meta), None, None, None
        # the copy's gradient (from the convolution) is a fresh buffer only this function sees: dX is added
        # into it in place, then one pass transposes its interior back to the source's layout
        own = gbase is not None and gbase.is_contiguous() and gbase.dtype == ctx.meta[1]
        d = rows.scatter(dX, *ctx.meta, into=gbase if own else None)
        if gbase is not None and not own:
            d = d + gbase
        ph, pw = rows.pad
        N, Hp, Wp, C = d.shape
        gx = torch.empty((N, C, Hp - 2 * ph, Wp - 2 * pw), dtype=d.dtype, device=d.device,
                         memory_format=ctx.memory_format)
        gx.copy_(d[:, ph:Hp - ph, pw:Wp - pw].permute(0, 3, 1, 2))
        return gx, None, None, None


def _sync_group(layer: nn.Module):
    """The process group a training forward of ``layer`` all-reduces over, or ``None``.

    The rule of :class:`torch.nn.SyncBatchNorm`: only in training, only with ``torch.distributed``
    initialised, and only when the group has more than one rank (``process_group=None`` on a
    synchronised layer means the default group).  Everything else computes local statistics.
    """
    if not (getattr(layer, "sync", False) and layer.training and dist.is_available() and dist.is_initialized()):
        return None
    group = layer.process_group if layer.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _moments(src, rows, group=None):
    """``_CentredMoments`` in float32 at least, autocast off: ``(mean, cov, n)`` (+ the padded copy)."""
    work = torch.promote_types(src.dtype, torch.float32)
    with torch.autocast(device_type=src.device.type, enabled=False), matmul_precision(src.device):
        return _CentredMoments.apply(src, rows, work, group)


def _whiten(mean, cov, *, eps, method, n_iter, tol, order=None, centred=True):
    r"""``(mean, D)``, ``D = (Cov + eps I)^{-1/2}`` (differentiable; TF32 off unless opted in).

    ``order``: a feature permutation applied to the statistics first; ``centred=False`` whitens the
    second moment ``Cov + mu mu^T`` instead (the reference ``ChannelDeconv``).
    """
    with torch.autocast(device_type=cov.device.type, enabled=False), matmul_precision(cov.device):
        if order is not None:
            mean, cov = mean[:, order], cov[:, order][:, :, order]
        if not centred:
            cov = cov + mean[:, :, None] * mean[:, None, :]
        cov = cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return mean, _inv_sqrt(cov, method, n_iter, tol)


def _memory_format(x: torch.Tensor):
    """channels_last for a (strictly) channels-last 4-D tensor, else contiguous_format."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _check_finite(x: torch.Tensor, layer: nn.Module) -> None:
    """Refuse a batch holding NaN or infinity before anything uses it.

    A single non-finite value turns ``Cov``, hence ``D``, NaN, and the running averages would
    keep it for ever (every later eval NaN).  One ``sum`` decides (finite sum => every value
    finite); only a non-finite sum, which a huge finite batch may also give, pays for the exact
    ``isfinite`` count.  One host sync, needed to raise; ``torch._assert_async`` would spare it
    on CUDA but reports a device-side assert that poisons the CUDA context, not a ValueError.
    """
    if math.isfinite(float(x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32)))):
        return
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        mode = "training" if layer.training else "eval"
        raise ValueError(
            f"{layer._describe()} got an input of shape {tuple(x.shape)} with {bad} of its {x.numel()} values NaN or "
            f"inf in {mode} mode; the layer and its running statistics are unchanged.  Find where the NaN/inf arises "
            "upstream (e.g. with torch.autograd.set_detect_anomaly, a lower learning rate or gradient clipping), or "
            "drop or clean the batch (torch.nan_to_num) before the layer"
        )


def _check_solver(method, n_iter, tol, eps, momentum):
    method = check_option(method, "method", METHODS)
    n_iter = check_positive_int(n_iter, "n_iter")
    if tol is not None:
        tol = float(tol)
        if not tol > 0:
            raise ValueError(f"expected tol > 0 (or None for a fixed n_iter), got {tol!r}")
    momentum = float(momentum)
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"expected momentum in (0, 1], got {momentum!r}")
    return method, n_iter, tol, check_nonnegative_float(eps, "eps"), momentum


def _solver_repr(m) -> str:
    s = f"n_iter={m.n_iter}, eps={m.eps:g}, momentum={m.momentum:g}"
    if m.method != "coupled" or m.tol is not None:
        s += f", method={m.method!r}, tol={m.tol}"
    return s + (", sync=True" if m.sync else "")


def _set_sync(layer: nn.Module, process_group, sync: bool) -> None:
    """``layer.sync`` / ``layer.process_group``: whether, and over which group, training statistics are
    all-reduced (``process_group=None`` with ``sync=True``: the default group, looked up at forward time)."""
    if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"expected process_group to be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}; create one with torch.distributed.new_group(ranks)")
    layer.process_group, layer.sync = process_group, bool(sync)


def _add_missing_counter(module, state_dict, prefix, key="running_mean"):
    """A state dict with running statistics but no ``num_batches_tracked`` (the reference
    ``FastDeconv`` and ``Delinear`` keep none) loads with the counter at 0."""
    if module.num_batches_tracked is not None and prefix + key in state_dict:
        state_dict.setdefault(prefix + "num_batches_tracked",
                              torch.zeros((), dtype=torch.long, device=module.num_batches_tracked.device))


# ---- Deconv2d -------------------------------------------------------------------------------

class Deconv2d(nn.Module):
    r"""Network deconvolution layer: ``y = conv2d((X - \mu) D, w) + b`` with ``D = (Cov + \epsilon I)^{-1/2}``.

    The im2col rows ``X`` of the input (Ye et al. 2020, Fig. 3) are centred and whitened
    per channel block before the convolution.  In training mode ``\mu`` and ``Cov`` are
    the statistics of the current batch (Algorithm 1: patches on a grid subsampled by
    ``sampling_stride``, ridge ``eps``) and ``D`` comes from ``n_iter`` coupled
    Newton–Schulz steps (§4.5.3), all differentiable, so gradients see the dependence of
    ``D`` on the input (appendix A.8, Eq. 12).  Running averages of ``\mu`` and ``D`` are
    kept (``momentum``, as the reference code does: it averages ``D``, not ``Cov``) and
    used in eval mode.  The whitening is never applied to the data: it is folded into the
    weights (implicit deconvolution, §4.5.1),

    .. math::  W' = D\,w, \qquad b' = b - \mu^T D\,w,

    per block, so ``y = conv2d(x, W', b')`` — one convolution of the original input.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        As in :class:`torch.nn.Conv2d` (zero padding).  With ``bias=False`` there is no
        learnable bias, but the folded mean correction ``-\mu^T D w`` is still added.
    block_size : int, optional
        Channels per whitening block ``B``.  ``None`` (default): the reference rule —
        ``min(64, in_channels)`` for ``groups=1`` (the paper's ``B = 64``), the whole group
        (``in_channels / groups``) for a grouped convolution.  A value larger than a group is
        clamped to it; otherwise it must divide the group (an error names the gcd, which the
        reference code takes silently).  With ``groups > 1`` a block smaller than the group
        warns (:class:`~nsiter.NsiterWarning`): the reference code always whitens whole groups.
    sampling_stride : int, default 3
        Subsampling ``S`` of the patch grid for the statistics (§4.5.2): patches every
        ``S * stride`` pixels.
    n_iter : int, default 5
        Newton–Schulz iterations (the cap when ``tol`` is given).
    eps : float, default 1e-5
        Ridge added to each covariance.
    momentum : float, default 0.1
        ``running = (1 - momentum) running + momentum batch``.
    grouping : {"reference", "contiguous"}, default "reference"
        How the channels of a convolution group form whitening blocks (see
        :func:`nsiter.patch_covariance`): ``"reference"`` — the reference code's interleaved
        blocks sharing ONE covariance; ``"contiguous"`` — channels ``[gB, (g+1)B)`` per block,
        one covariance each.  With ``block_size >= in_channels / groups`` both coincide.
    freeze : bool, default False
        The reference ``freeze``: in training, after ``freeze_iter + 1`` steps with batch
        statistics the layer uses its running statistics (no gradient through them) until the
        counter ``num_batches_tracked mod (10 freeze_iter)`` wraps, then re-estimates for
        ``freeze_iter + 1`` steps, and so on.  The counter is the state-dict buffer, so a saved
        layer resumes its cycle (the reference counter restarts at 0 on load).
    freeze_iter : int, default 100
    track_running_stats : bool, default True
        As in :class:`torch.nn.BatchNorm2d`: ``False`` keeps no running buffers (they are
        ``None``) and uses batch statistics in eval mode too.
    sampling : {"grid", "reference"}, default "grid"
        See :data:`SAMPLINGS`; they differ for 1x1 kernels only.
    method : str, default "coupled"
        ``"coupled"`` with ``tol=None``: the reference code's ``n_iter`` coupled steps (no host
        sync).  Any other :data:`nsiter.newton_schulz.METHODS` entry, or a ``tol``, goes through
        :func:`nsiter.inv_sqrtm` (differentiable; its input checks cost host syncs).
    tol : float, optional
        Stopping tolerance for :func:`nsiter.inv_sqrtm`.
    process_group : torch.distributed.ProcessGroup, optional
        Training statistics over the global batch of this group's ranks (see
        :func:`convert_sync_deconv`, which also synchronises over the default group); ``None``
        (default): statistics of the local batch.  Attribute ``sync`` says whether the layer
        synchronises.
    device, dtype
        Factory keywords of the parameters and buffers.

    Attributes
    ----------
    weight : Parameter, shape (out_channels, in_channels / groups, kh, kw)
    bias : Parameter or None, shape (out_channels,)
    running_mean : buffer, shape (groups, S, Fb)
    running_deconv : buffer, shape (groups, S, Fb, Fb)
        ``S = 1`` for ``"reference"``, ``in_channels / (groups B)`` for ``"contiguous"``;
        ``Fb = B kh kw``.  Initialised to 0 and the identity (a plain convolution).
    num_batches_tracked : buffer (int64)
        Training forwards so far (the freeze counter).

    Notes
    -----
    ``load_state_dict`` accepts the reference ``FastDeconv`` layout (``running_mean`` of shape
    ``(Fb,)`` or ``(groups Fb,)``, ``running_deconv`` ``(Fb, Fb)`` or ``(groups, Fb, Fb)``, no
    ``num_batches_tracked``) for the ``"reference"`` grouping.  In training the batch is
    copied once to padded channels-last memory; the statistics gather their patches from that
    copy (taps outermost, channels innermost: contiguous runs) and the convolution reads it too
    (oneDNN / cuDNN are faster on channels-last); the output comes back in the input's memory
    format.  Eval mode is one ``conv2d`` of the input with the folded weights.  The
    whitening statistics and iterations run in float32 at least (also under autocast) with
    TF32 off unless :func:`set_allow_tf32` says otherwise; the convolution itself follows the
    caller's settings.  A batch holding NaN or inf raises ``ValueError`` before any buffer
    changes, in training and eval.  Double backward is not supported.

    Examples
    --------
    >>> import torch, nsiter.torch as nt
    >>> torch.manual_seed(0) and None
    >>> net = torch.nn.Sequential(nt.Deconv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
    ...                           nt.Deconv2d(16, 32, 3, padding=1, block_size=8))
    >>> net(torch.randn(8, 3, 32, 32)).shape
    torch.Size([8, 32, 32, 32])
    >>> net.eval()(torch.randn(1, 3, 32, 32)).shape    # eval: running statistics, folded weights
    torch.Size([1, 32, 32, 32])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, block_size=None, sampling_stride=3, n_iter=5, eps=1e-5, momentum=0.1,
                 grouping="reference", *, freeze=False, freeze_iter=100, track_running_stats=True,
                 sampling="grid", method="coupled", tol=None, process_group=None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        _set_sync(self, process_group, process_group is not None)
        in_channels = check_positive_int(in_channels, "in_channels")
        out_channels = check_positive_int(out_channels, "out_channels")
        groups = check_positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}; "
                "choose groups among their common divisors"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = as_pair(kernel_size, "kernel_size", minimum=1)
        self.stride = as_pair(stride, "stride", minimum=1)
        self.padding = as_pair(padding, "padding", minimum=0)
        self.dilation = as_pair(dilation, "dilation", minimum=1)
        self.sampling_stride = check_positive_int(sampling_stride, "sampling_stride")
        self.method, self.n_iter, self.tol, self.eps, self.momentum = _check_solver(method, n_iter, tol, eps,
                                                                                   momentum)
        self.grouping = check_option(grouping, "grouping", GROUPINGS)
        self.sampling = check_option(sampling, "sampling", SAMPLINGS)
        self.freeze, self.freeze_iter = bool(freeze), check_positive_int(freeze_iter, "freeze_iter")
        self.track_running_stats = bool(track_running_stats)
        if self.freeze and not self.track_running_stats:
            raise ValueError("freeze=True uses the running statistics, which track_running_stats=False does not keep; "
                             "set track_running_stats=True or freeze=False")
        cg = in_channels // groups
        requested = (64 if groups == 1 else cg) if block_size is None else check_positive_int(block_size, "block_size")
        block = min(requested, cg)
        if cg % block:
            fix = math.gcd(block, cg)
            raise ValueError(
                f"block_size {requested} does not divide the {cg} input channels per convolution group; "
                f"use block_size={fix} (gcd({requested}, {cg})) or another divisor of {cg}"
            )
        if groups > 1 and block != cg:
            warn(f"Deconv2d(groups={groups}, block_size={block_size}) whitens blocks of {block} channels inside each "
                 f"group of {cg}; the reference FastDeconv always whitens whole groups (block = in_channels // groups "
                 f"= {cg}).  Pass block_size=None for the reference rule", NsiterWarning)
        self.block_size = block
        kh, kw = self.kernel_size
        self._blocks = cg // block  # whitening blocks per convolution group
        self._fb = block * kh * kw  # features per block
        self._shared = 1 if grouping == "reference" else self._blocks

        self.weight = nn.Parameter(torch.empty((out_channels, cg, kh, kw), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros((groups, self._shared, self._fb), **factory))
            eye = torch.eye(self._fb, **factory).expand(groups, self._shared, self._fb, self._fb)
            self.register_buffer("running_deconv", eye.clone())
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_deconv", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation of the weights and bias; running statistics reset."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        if not self.track_running_stats:
            return
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_deconv.copy_(torch.eye(self._fb, dtype=self.running_deconv.dtype,
                                                device=self.running_deconv.device).expand_as(self.running_deconv))
            self.num_batches_tracked.zero_()

    def _describe(self) -> str:
        return f"Deconv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size})"

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        s += (f", block_size={self.block_size}, sampling_stride={self.sampling_stride}, {_solver_repr(self)}, "
              f"grouping={self.grouping!r}")
        if self.sampling != "grid":
            s += f", sampling={self.sampling!r}"
        if self.freeze:
            s += f", freeze=True, freeze_iter={self.freeze_iter}"
        if not self.track_running_stats:
            s += ", track_running_stats=False"
        return s

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """nsiter's own state dicts and the reference ``FastDeconv``'s (flat buffers, no counter)."""
        _add_missing_counter(self, state_dict, prefix)
        if self.track_running_stats and self._shared == 1:
            for name in ("running_mean", "running_deconv"):
                t, want = state_dict.get(prefix + name), getattr(self, name).shape
                if isinstance(t, torch.Tensor) and t.shape != want and t.numel() == math.prod(want):
                    state_dict[prefix + name] = t.reshape(want)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- statistics ------------------------------------------------------------------

    def _sample_rows(self, x: torch.Tensor):
        """``(_Rows, order)`` of the whitening samples (Algorithm 1 with the sampling grid).

        The rows are gathered from the batch's padded channels-last copy, taps outermost and
        channels innermost, ``(i, j, c)``: contiguous runs; ``order`` puts the statistics back in
        the im2col order ``(c, i, j)`` of the weights.  The reference grouping with several blocks
        per group stacks interleaved columns (``columns``, ``stack``).
        """
        G, nb, B, fb = self.groups, self._blocks, self.block_size, self._fb
        C = self.in_channels
        cg = C // G
        kh, kw = self.kernel_size
        S = self.sampling_stride
        interleaved = self.grouping == "reference" and nb > 1
        Bk = cg if self.grouping == "reference" else B  # channels of one gathered block
        dev = x.device
        if self.sampling == "reference" and kh == kw == 1:  # every (S stride)^2-th pixel, as FastDeconv
            step = S * self.stride[0] * S * self.stride[1]
            if interleaved:  # channel c of a group: block c mod nb, feature c div nb
                view = lambda t: t.view(-1, C)[::step].view(-1, G, fb, nb).permute(1, 0, 3, 2)  # noqa: E731
                return _Rows(view, 2, covers=step == 1, pad=(0, 0)), None
            view = lambda t: t.view(-1, C)[::step].view(-1, C // Bk, Bk).transpose(0, 1)  # noqa: E731
            return _Rows(view, 1, covers=step == 1, pad=(0, 0)), None
        g = geometry(tuple(x.shape), self.kernel_size, (self.stride[0] * S, self.stride[1] * S), self.padding,
                     self.dilation)
        dh, dw = self.dilation
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1

        def view(t):  # (K, N, oh, ow, kh, kw, Bk)
            u = t.unfold(1, span_h, g.sh).unfold(2, span_w, g.sw)  # (N, oh, ow, C, span_h, span_w)
            if dh > 1 or dw > 1:
                u = u[..., ::dh, ::dw]
            u = u.permute(0, 1, 2, 4, 5, 3)
            return u.view(*u.shape[:5], C // Bk, Bk).permute(5, 0, 1, 2, 3, 4, 6)

        def covered(n_out, step, k, dil, pad, size):  # every interior row / column is in some patch
            hit = {a * step + i * dil for a in range(n_out) for i in range(k)}
            return all(r in hit for r in range(pad, pad + size))

        overlap = (g.oh > 1 and g.sh < span_h) or (g.ow > 1 and g.sw < span_w)
        pieces = tuple((slice(None),) * 4 + (i, j) for i in range(kh) for j in range(kw)) if overlap else ((),)
        covers = covered(g.oh, g.sh, kh, dh, g.ph, g.h) and covered(g.ow, g.sw, kw, dw, g.pw, g.w)
        kk = kh * kw
        if interleaved:  # im2col column j = c kk + p of a group -> block j mod nb, feature j div nb
            t = torch.arange(kk * cg, device=dev)
            j = (t % fb) * nb + t // fb
            columns = (j % kk) * cg + j // kk
            return _Rows(view, 3, pieces, covers, columns, nb, self.padding), None
        order = None
        if kk > 1:
            f = torch.arange(fb, device=dev)
            order = (f % kk) * Bk + f // kk
        return _Rows(view, 3, pieces, covers, pad=self.padding), order

    def _statistics(self, x: torch.Tensor):
        """``(mean, D, xs)``: the batch statistics and the padded channels-last copy ``xs`` they read."""
        rows, order = self._sample_rows(x)
        mean, cov, _, xs = _moments(x, rows, _sync_group(self))
        mean, D = _whiten(mean, cov, eps=self.eps, method=self.method, n_iter=self.n_iter, tol=self.tol,
                          order=order)
        G, S = self.groups, self._shared
        return mean.reshape(G, S, self._fb), D.reshape(G, S, self._fb, self._fb), (xs, rows.pad)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got input of shape {tuple(x.shape)}")

    def batch_statistics(self, x: torch.Tensor):
        """``(mean (groups, S, Fb), D (groups, S, Fb, Fb))`` of the batch ``x`` (differentiable)."""
        self._check_input(x)
        return self._statistics(x)[:2]

    def folded_weights(self, mean: torch.Tensor, D: torch.Tensor):
        """Implicit deconvolution (§4.5.1): ``W' = D w`` per block and ``b' = b - mu^T D w`` (as the reference
        code: weight rows times ``D``; no copy with one block per group)."""
        G, nb, fb = self.groups, self._blocks, self._fb
        O = self.out_channels
        og = O // G
        w = self.weight.to(D.dtype)
        if self.grouping == "reference":  # rows w[g, o, :, c] (block c) times D[g]: one product per group
            wf = torch.matmul(w.reshape(G, og, fb, nb).transpose(2, 3).reshape(G, og * nb, fb), D[:, 0])
            corr = torch.matmul(wf, mean[:, 0, :, None]).reshape(G, og, nb).sum(-1)
            wf = wf.reshape(G, og, nb, fb).transpose(2, 3)
        else:  # rows w[g, o, c, :] times D[g, c]: one product per block
            wf = torch.matmul(w.reshape(G, og, nb, fb).transpose(1, 2).reshape(G * nb, og, fb),
                              D.reshape(G * nb, fb, fb))
            corr = torch.matmul(wf, mean.reshape(G * nb, fb, 1)).reshape(G, nb, og).sum(1)
            wf = wf.reshape(G, nb, og, fb).transpose(1, 2)  # no copy with one block per group
        weight = wf.reshape(self.weight.shape).to(self.weight.dtype)
        corr = corr.reshape(O)
        bias = -corr if self.bias is None else self.bias.to(corr.dtype) - corr
        return weight, bias.to(self.weight.dtype)

    # ---- forward ---------------------------------------------------------------------

    def _frozen(self) -> bool:
        """The reference freeze rule on the counter before this step (one host read, only with freeze=True)."""
        return self.freeze and int(self.num_batches_tracked) % (10 * self.freeze_iter) > self.freeze_iter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv2d((X - mu) D, w) + b`` (see the class docstring); a batch with NaN or inf raises ValueError
        before any buffer changes, in training and eval."""
        self._check_input(x)
        _check_finite(x, self)
        tracking = self.training and self.track_running_stats
        if not self.track_running_stats or (self.training and not self._frozen()):
            mean, D, (xs, pad) = self._statistics(x)
            if tracking:
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                    self.running_deconv.lerp_(D.detach().to(self.running_deconv.dtype), self.momentum)
            weight, bias = self.folded_weights(mean, D)
            if pad == self.padding:  # the convolution reads the statistics' channels-last copy
                y = F.conv2d(xs.permute(0, 3, 1, 2), weight, bias, self.stride, 0, self.dilation, self.groups)
                y = y.contiguous(memory_format=_memory_format(x))
            else:
                y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            weight, bias = self.folded_weights(self.running_mean, self.running_deconv)
            y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if tracking:
            self.num_batches_tracked += 1
        return y


# ---- ChannelDeconv and Delinear ---------------------------------------------------------------

def _lerp_first_copy(buf: torch.Tensor, value: torch.Tensor, momentum: float, first: torch.Tensor) -> None:
    """``buf <- (1 - m) buf + m value``, or ``value`` when ``first`` (no host sync)."""
    weight = torch.where(first, buf.new_ones(()), buf.new_full((), momentum))
    buf.lerp_(value.detach().to(buf.dtype).reshape(buf.shape), weight)


class ChannelDeconv(nn.Module):
    r"""Channel deconvolution (the reference ``ChannelDeconv``): ``y = D (x - \mu)`` over channel blocks.

    The first ``c = B floor(C / B)`` channels are whitened: channel ``k (c/B) + r`` is feature
    ``k`` of sample ``(r, n, h, w)`` (``B`` features, ``(c/B) N H W`` samples, every
    ``sampling_stride^2``-th of them, in that flattened order, when ``H, W >= sampling_stride``),
    ``\mu`` their mean and ``D = (M + \epsilon I)^{-1/2}`` with ``M`` the *uncentred* second moment
    of the subsampled samples (the reference code takes the subsampled view before removing the
    mean; ``covariance="centred"`` whitens the covariance instead).  The remaining ``C - c``
    channels are standardised together by one mean and (unbiased) variance.  Ye et al. 2020 use it
    before the classifier of their ResNet/ResNeXt/VGG variants.  Running averages (``momentum``;
    the first training batch is copied, as the reference does) serve eval mode.

    Parameters
    ----------
    block : int
        Number of whitened features ``B``.
    eps : float, default 1e-2
        Ridge added to ``M`` (and to the variance of the remaining channels).
    n_iter : int, default 5
    momentum : float, default 0.1
    sampling_stride : int, default 3
    covariance : {"uncentred", "centred"}, default "uncentred"
        See :data:`COVARIANCES`; ``"uncentred"`` is what the reference code and the paper's
        experiments used.
    method, tol, process_group
        As in :class:`Deconv2d`.
    device, dtype
        Factory keywords of the buffers.

    Attributes
    ----------
    running_mean1 : buffer (B, 1)
    running_deconv : buffer (B, B)
    running_mean2, running_var : buffers (1, 1)
        Statistics of the remaining channels.
    num_batches_tracked : buffer (int64)

    Notes
    -----
    Input ``(N, C)`` or ``(N, C, H, W)``; the state dict is the reference's.  Before any training
    step, eval mode uses the initial buffers (``D = I``, ``\mu = 0``, variance 1), where the
    reference code fails.
    """

    def __init__(self, block, eps=1e-2, n_iter=5, momentum=0.1, sampling_stride=3, *, covariance="uncentred",
                 method="coupled", tol=None, process_group=None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        _set_sync(self, process_group, process_group is not None)
        self.block = check_positive_int(block, "block")
        self.method, self.n_iter, self.tol, self.eps, self.momentum = _check_solver(method, n_iter, tol, eps,
                                                                                   momentum)
        self.sampling_stride = check_positive_int(sampling_stride, "sampling_stride")
        self.covariance = check_option(covariance, "covariance", COVARIANCES)
        B = self.block
        self.register_buffer("running_mean1", torch.zeros((B, 1), **factory))
        self.register_buffer("running_deconv", torch.eye(B, **factory))
        self.register_buffer("running_mean2", torch.zeros((1, 1), **factory))
        self.register_buffer("running_var", torch.ones((1, 1), **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _describe(self) -> str:
        return f"ChannelDeconv({self.block})"

    def extra_repr(self) -> str:
        s = f"{self.block}, sampling_stride={self.sampling_stride}, {_solver_repr(self)}"
        return s + (f", covariance={self.covariance!r}" if self.covariance != "uncentred" else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.ndim == 2:
            x = x.reshape(*shape, 1, 1)
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (N, C) or (N, C, H, W), got shape {tuple(shape)}")
        N, C, H, W = x.shape
        B = self.block
        c = C // B * B
        if c == 0:
            raise ValueError(f"ChannelDeconv({B}) needs at least {B} channels, got input of shape {tuple(shape)}; "
                             f"use block <= {C}")
        _check_finite(x, self)
        s = self.sampling_stride
        step = s * s if s > 1 and H >= s and W >= s else 1
        work = torch.promote_types(x.dtype, torch.float32)
        x1 = x[:, :c].transpose(0, 1).reshape(B, -1)  # row k: channels [k c/B, (k+1) c/B) x (N, H, W)
        if self.training:
            rows = _Rows(lambda t: t[:, ::step].t()[None], 1, covers=step == 1)
            group = _sync_group(self)
            mean1, D = _whiten(*_moments(x1, rows, group)[:2], eps=self.eps, method=self.method, n_iter=self.n_iter,
                               tol=self.tol, centred=self.covariance == "centred")
            mean1, D = mean1[0][:, None], D[0]
            first = self.num_batches_tracked == 0
            with torch.no_grad():
                _lerp_first_copy(self.running_mean1, mean1, self.momentum, first)
                _lerp_first_copy(self.running_deconv, D, self.momentum, first)
        else:
            mean1, D = self.running_mean1.to(work), self.running_deconv.to(work)
        y = (D @ (x1.to(work) - mean1)).to(x.dtype).reshape(c, N, H, W).transpose(0, 1)
        if c != C:  # the remaining channels: one mean and variance
            rest = x[:, c:]
            if self.training:
                # one feature: the (N, (C - c) H W) values, every step-th of each sample's, as one column
                view = lambda t: t.reshape(N, -1)[:, ::step][None, :, :, None]  # noqa: E731
                mean2, m2, n2 = _moments(rest, _Rows(view, 2, covers=step == 1), group)
                mean2, var = mean2.reshape(()), m2.reshape(()) * (n2 / (n2 - 1))  # unbiased, as xs.var()
                with torch.no_grad():
                    _lerp_first_copy(self.running_mean2, mean2, self.momentum, first)
                    _lerp_first_copy(self.running_var, var, self.momentum, first)
            else:
                mean2, var = self.running_mean2, self.running_var
            y = torch.cat([y, ((rest - mean2) / (var + self.eps).sqrt()).to(x.dtype)], dim=1)
        if self.training:
            self.num_batches_tracked += 1
        return y.reshape(shape) if len(shape) == 2 else y


class Delinear(nn.Module):
    r"""Deconvolution before a fully connected layer (the reference ``Delinear``): ``y = (x - \mu) D W^T + b``.

    The ``in_features`` inputs split into ``in_features / B`` contiguous chunks of ``B`` features;
    every chunk of every sample is one sample of ONE shared ``B x B`` covariance (``B =
    in_features``, the paper's setting for fully connected layers, whitens all inputs together).
    Folded into the weights as :class:`Deconv2d` does: ``W' = W D`` per chunk,
    ``b' = b - W' \mu``.  Running averages of ``\mu`` and ``D`` (``momentum``) serve eval mode.

    Parameters
    ----------
    in_features, out_features, bias
        As in :class:`torch.nn.Linear`; inputs ``(*, in_features)``.
    eps : float, default 1e-5
    n_iter : int, default 5
    momentum : float, default 0.1
    block : int, default 512
        ``B``, clamped to ``in_features``; it must divide ``in_features`` (an error names the gcd,
        which the reference code takes with a printed note).
    method, tol, process_group
        As in :class:`Deconv2d`.
    device, dtype
        Factory keywords.

    Attributes
    ----------
    weight : Parameter (out_features, in_features)
    bias : Parameter or None (out_features,)
    running_mean : buffer (B,)
    running_deconv : buffer (B, B)
    num_batches_tracked : buffer (int64)
        Not in the reference; a reference state dict (without it) loads with 0.
    """

    def __init__(self, in_features, out_features, bias=True, eps=1e-5, n_iter=5, momentum=0.1, block=512, *,
                 method="coupled", tol=None, process_group=None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        _set_sync(self, process_group, process_group is not None)
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        self.method, self.n_iter, self.tol, self.eps, self.momentum = _check_solver(method, n_iter, tol, eps,
                                                                                   momentum)
        requested = check_positive_int(block, "block")
        B = min(requested, in_features)
        if in_features % B:
            raise ValueError(f"block {requested} does not divide in_features={in_features}; use "
                             f"block={math.gcd(B, in_features)} (gcd({requested}, {in_features})) or another divisor")
        self.block = B
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(B, **factory))
        self.register_buffer("running_deconv", torch.eye(B, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _describe(self) -> str:
        return f"Delinear({self.in_features}, {self.out_features})"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, {_solver_repr(self)}")

    def _load_from_state_dict(self, state_dict, prefix, *args):
        _add_missing_counter(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected input of shape (*, {self.in_features}), got shape {tuple(x.shape)}")
        _check_finite(x, self)
        B = self.block
        if self.training:
            src = x.contiguous()
            mean, D = _whiten(*_moments(src, _Rows(lambda t: t.view(1, -1, B), 1), _sync_group(self))[:2], eps=self.eps,
                              method=self.method, n_iter=self.n_iter, tol=self.tol)
            mean, D = mean[0], D[0]
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_deconv.lerp_(D.detach().to(self.running_deconv.dtype), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, D = self.running_mean, self.running_deconv
        O = self.out_features
        w = self.weight.to(D.dtype).reshape(-1, B) @ D  # (O in/B, B)
        corr = (w @ mean.to(D.dtype)).reshape(O, -1).sum(1)
        b = -corr if self.bias is None else self.bias.to(corr.dtype) - corr
        return F.linear(x, w.reshape(O, -1).to(x.dtype), b.to(x.dtype))


# ---- the paper's recipe for a whole model -----------------------------------------------------

def _conv_padding(conv: nn.Conv2d):
    if conv.padding_mode != "zeros":
        raise ValueError(f"{conv} uses padding_mode={conv.padding_mode!r}; Deconv2d pads with zeros only")
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total) or any(s != 1 for s in conv.stride):
            raise ValueError(f"{conv} uses padding='same' with an even kernel span; give explicit padding")
        return tuple(t // 2 for t in total)
    return conv.padding


def convert_to_deconv(model: nn.Module, *, block_size=64, sampling_stride=3, n_iter=5, eps=1e-5, momentum=0.1,
                      linear=True, linear_block=None, inplace=False, **deconv_kwargs) -> nn.Module:
    r"""The paper's recipe on a model: batch norms removed, deconvolution before every conv / linear layer.

    Ye et al. 2020, §5: "remove all batch normalisations and replace them with deconvolution
    before each convolution / fully connected layer".  Every ``nn.Conv2d`` becomes a
    :class:`Deconv2d` with the same geometry, weights and bias (a bias is added, zero, where the
    convolution had none: the batch norm's shift is gone), every ``nn.Linear`` a
    :class:`Delinear` (``linear=False`` keeps them) and every batch norm (``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``) an ``nn.Identity``.  Subclasses of ``Conv2d`` / ``Linear`` are left as they
    are (they may have their own forward, e.g. attention's output projection).

    Parameters
    ----------
    model : nn.Module
    block_size : int, default 64
        ``B`` of the convolutions (the paper's 64); where it does not divide the channels of a
        layer the gcd is used, as the reference code does.  Grouped convolutions whiten whole
        groups (the reference rule).
    sampling_stride, n_iter, eps, momentum
        Passed to every :class:`Deconv2d` (and ``n_iter``, ``eps``, ``momentum`` to :class:`Delinear`).
    linear : bool, default True
    linear_block : int, optional
        ``B`` of the linear layers; default ``in_features`` (the paper's setting).
    inplace : bool, default False
        Convert ``model`` itself instead of a deep copy.
    **deconv_kwargs
        Further :class:`Deconv2d` keywords (``grouping``, ``sampling``, ``method``, ...).

    Returns
    -------
    nn.Module
        The converted model, in training mode as the input was, with the input's devices and dtypes.
    """
    model = model if inplace else copy.deepcopy(model)

    def new_layer(child):
        if type(child) is nn.Conv2d:
            w = child.weight
            cg = child.in_channels // child.groups
            block = None if child.groups > 1 else math.gcd(block_size, cg) if cg % min(block_size, cg) else block_size
            layer = Deconv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                             _conv_padding(child), child.dilation, child.groups, True, block, sampling_stride, n_iter,
                             eps, momentum, device=w.device, dtype=w.dtype, **deconv_kwargs)
        elif type(child) is nn.Linear and linear:
            w = child.weight
            layer = Delinear(child.in_features, child.out_features, True, eps, n_iter, momentum,
                             linear_block or child.in_features, device=w.device, dtype=w.dtype)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            return nn.Identity()
        else:
            return None
        with torch.no_grad():
            layer.weight.copy_(child.weight)
            if child.bias is None:
                layer.bias.zero_()
            else:
                layer.bias.copy_(child.bias)
        return layer.train(child.training)

    def convert(module):
        for name, child in module.named_children():
            layer = new_layer(child)
            if layer is None:
                convert(child)
            else:
                setattr(module, name, layer)

    convert(model)
    return model


def convert_sync_deconv(module: nn.Module, process_group=None) -> nn.Module:
    r"""Synchronise every deconvolution layer of ``module`` over ``process_group``, in place.

    The counterpart of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: every
    :class:`Deconv2d`, :class:`ChannelDeconv` and :class:`Delinear` inside ``module`` (``module``
    itself included) computes its training statistics over the whole batch of all ranks of
    ``process_group`` (``None``: the default group, looked up at each forward).  The count, the sums
    and the centred cross-products are all-reduced before ``inv_sqrtm`` (``F^2 + F + 1`` numbers per
    block and step) and their gradients are all-reduced in the backward, so outputs, input
    gradients and running statistics are those of one process holding the global batch, and
    weight gradients summed over the ranks (what ``DistributedDataParallel`` all-reduces) are the
    global batch's.  The patches of a rank's images are its samples: with the default grid
    sampling the union over ranks is the global batch's sample set.

    As for ``SyncBatchNorm``, synchronisation happens in training mode only, with
    ``torch.distributed`` initialised and the group holding more than one rank; otherwise the
    layers compute local statistics.  Every rank must run the same sequence of training forwards
    and backwards (each is a collective).  Convert before wrapping in ``DistributedDataParallel``.

    Returns
    -------
    nn.Module
        ``module`` (converted in place; a returned value, so that ``model =
        convert_sync_deconv(model)`` reads as the batch-norm idiom does).
    """
    for m in module.modules():
        if isinstance(m, (Deconv2d, ChannelDeconv, Delinear)):
            _set_sync(m, process_group, True)
    return module


# ---- streaming statistics ----------------------------------------------------------------------

class PatchStatistics(_NumpyPatchStatistics):
    """:class:`nsiter.PatchStatistics` with the moments computed by torch on the tensor's device.

    ``update(x)`` forms the (chunked) im2col rows and their centred moments on ``x.device``
    in ``x``'s dtype (:mod:`nsiter._torch.patches`); only the ``G (Fb^2 + Fb)`` float64
    moments travel to the host, where batches and shards merge exactly (Chan et al.) — also
    with numpy accumulators of the same settings.  ``covariance(eps)`` returns tensors on the
    device of the last update (float32 while every update was float32 or lower, else float64).
    """

    _device_moments = True

    def __init__(self, kernel_size, *, stride=1, padding=0, dilation=1, sampling_stride=1,
                 block_size=None, grouping="contiguous"):
        super().__init__(kernel_size, stride=stride, padding=padding, dilation=dilation,
                         sampling_stride=sampling_stride, block_size=block_size, grouping=grouping)
        self.device = None

    def update(self, x):
        """Add the patches of a tensor (or array) batch ``x``; returns ``self``.

        Validation as in :func:`nsiter.patch_covariance`; a failed update leaves ``self`` unchanged.
        """
        # arrays pass nsiter's array rules first (a masked array is refused, not unmasked)
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(as_float_array(x, "x"))
        super().update(t)
        self.device = t.device
        return self

    def covariance(self, eps=0.0):
        """``(cov, mean)`` tensors shaped as :func:`nsiter.patch_covariance` returns them."""
        cov, mean = super().covariance(eps)
        dev = self.device if self.device is not None else torch.device("cpu")
        return torch.as_tensor(cov, device=dev), torch.as_tensor(mean, device=dev)
