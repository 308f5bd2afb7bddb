r"""PyTorch layers and utilities of nsiter: network deconvolution as a drop-in ``nn.Module``.

``import nsiter`` never imports torch; ``import nsiter.torch`` does.  The public nsiter
functions (:func:`nsiter.im2col`, :func:`nsiter.patch_covariance`, :func:`nsiter.inv_sqrtm`,
...) accept tensors already; this module adds what only makes sense in torch:

* :class:`Deconv2d` — whitening (Ye et al. 2020, Algorithm 1 and §4.5) followed by a
  convolution, usable in place of ``nn.Conv2d`` + ``nn.BatchNorm2d``;
* :class:`PatchStatistics` — the streaming patch covariance with the heavy work on the
  tensor's device;
* :func:`set_allow_tf32` / :func:`allow_tf32` — opt in to TF32 for nsiter's CUDA matrix
  products (off by default: it costs three decimal digits of the whitening);
  :func:`set_cuda_graphs` — switch the CUDA-graph path of small Newton–Schulz problems.

Example
-------
>>> import torch, nsiter.torch as nt
>>> layer = nt.Deconv2d(3, 8, 3, padding=1)           # replaces Conv2d(3, 8, 3, padding=1) + BN
>>> y = layer(torch.randn(4, 3, 16, 16))              # train mode: batch statistics
>>> y.shape
torch.Size([4, 8, 16, 16])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._backend import backend
from ._conventions import geometry
from ._torch import allow_tf32, matmul_precision, set_allow_tf32, set_cuda_graphs
from ._torch import patches as _patches
from ._validation import as_pair, check_nonnegative_float, check_option, check_positive_int
from .covariance import GROUPINGS
from .covariance import PatchStatistics as _NumpyPatchStatistics
from .newton_schulz import _run_fixed

__all__ = ["Deconv2d", "PatchStatistics", "set_allow_tf32", "allow_tf32", "set_cuda_graphs", "GROUPINGS"]


def _newton_schulz(cov: torch.Tensor, n_iter: int) -> torch.Tensor:
    """The reference code's ``isqrt_newton_schulz_autograd(_batch)`` on ``(B, n, n)``.

    ``c = ||Cov||_F`` in the working dtype, ``Y_0 = Cov / c``, ``n_iter`` coupled steps
    (Higham 2008, Eq. 6.35), ``D = Z / sqrt(c)``; differentiable end to end.
    """
    c = torch.linalg.matrix_norm(cov)[:, None, None]
    Z, _ = _run_fixed(backend(cov), cov / c, n_iter, None, want_y=False)
    return Z / torch.sqrt(c)


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
    block_size : int, default 64
        Channels per whitening block ``B`` (the paper's default).  Clamped to the channels
        of one convolution group (``in_channels / groups``) when larger, as the reference
        code does for the first layer; otherwise it must divide them.
    sampling_stride : int, default 3
        Subsampling ``S`` of the patch grid for the statistics (§4.5.2): patches every
        ``S * stride`` pixels.
    n_iter : int, default 5
        Coupled Newton–Schulz iterations (Frobenius scaling, as the reference code).
    eps : float, default 1e-5
        Ridge added to each covariance.
    momentum : float, default 0.1
        ``running = (1 - momentum) running + momentum batch``.
    grouping : {"reference", "contiguous"}, default "reference"
        How the channels of a convolution group form whitening blocks (see
        :func:`nsiter.patch_covariance`): ``"reference"`` — the reference code's interleaved
        blocks sharing ONE covariance; ``"contiguous"`` — channels ``[gB, (g+1)B)`` per block,
        one covariance each.  With ``block_size >= in_channels / groups`` both coincide.
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

    Notes
    -----
    Differences from the reference ``FastDeconv``: 1x1 kernels use the same subsampled
    patch grid as larger kernels (the reference takes every ``S^2``-th pixel of the
    flattened batch instead); ``block_size`` not dividing the channels is an error naming
    the gcd (the reference silently uses the gcd); grouped convolutions may use blocks
    smaller than a group.  The whitening statistics and iterations run in float32 at
    least (also under autocast) with TF32 off unless :func:`set_allow_tf32` says otherwise;
    the convolution itself follows the caller's settings.

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
                 bias=True, block_size=64, sampling_stride=3, n_iter=5, eps=1e-5, momentum=0.1,
                 grouping="reference", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
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
        self.n_iter = check_positive_int(n_iter, "n_iter")
        self.eps = check_nonnegative_float(eps, "eps")
        momentum = float(momentum)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"expected momentum in (0, 1], got {momentum!r}")
        self.momentum = momentum
        self.grouping = check_option(grouping, "grouping", GROUPINGS)
        cg = in_channels // groups
        block = min(check_positive_int(block_size, "block_size"), cg)
        if cg % block:
            fix = math.gcd(block, cg)
            raise ValueError(
                f"block_size {block_size} does not divide the {cg} input channels per convolution group; "
                f"use block_size={fix} (gcd({block_size}, {cg})) or another divisor of {cg}"
            )
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
        self.register_buffer("running_mean", torch.zeros((groups, self._shared, self._fb), **factory))
        eye = torch.eye(self._fb, **factory).expand(groups, self._shared, self._fb, self._fb)
        self.register_buffer("running_deconv", eye.clone())
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long,
                                                                 device=device))
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
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_deconv.copy_(torch.eye(self._fb, dtype=self.running_deconv.dtype,
                                                device=self.running_deconv.device).expand_as(self.running_deconv))
            self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return (s + f", block_size={self.block_size}, sampling_stride={self.sampling_stride}, "
                f"n_iter={self.n_iter}, eps={self.eps:g}, momentum={self.momentum:g}, grouping={self.grouping!r}")

    # ---- statistics ------------------------------------------------------------------

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Whitening samples of ``x``: ``(groups * S, R', Fb)`` from the subsampled im2col."""
        s = self.sampling_stride
        g = geometry(tuple(x.shape), self.kernel_size, (self.stride[0] * s, self.stride[1] * s),
                     self.padding, self.dilation)
        X = _patches.im2col(x, g)  # (R, C kh kw), rows = patches, columns c*kh*kw + i*kw + j
        R = X.shape[0]
        G, nb, fb = self.groups, self._blocks, self._fb
        Xg = X.reshape(R, G, nb * fb)  # convolution groups hold contiguous channels
        if self.grouping == "reference":  # column j of a group -> block j mod nb, feature j div nb
            Xg = Xg.reshape(R, G, fb, nb).permute(1, 0, 3, 2).reshape(G, R * nb, fb)
        else:
            Xg = Xg.reshape(R, G, nb, fb).permute(1, 2, 0, 3).reshape(G * nb, R, fb)
        return Xg

    def batch_statistics(self, x: torch.Tensor):
        """``(mean (groups, S, Fb), D (groups, S, Fb, Fb))`` of the batch ``x`` (differentiable)."""
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got input of shape {tuple(x.shape)}")
        work = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False), matmul_precision(x.device):
            rows = self._rows(x.to(work))
            n, mean, M2 = _patches.centred_stats(rows)
            eye = torch.eye(self._fb, dtype=work, device=x.device)
            cov = M2 / n + self.eps * eye
            D = _newton_schulz(cov, self.n_iter)
        G, S = self.groups, self._shared
        return mean.reshape(G, S, self._fb), D.reshape(G, S, self._fb, self._fb)

    def folded_weights(self, mean: torch.Tensor, D: torch.Tensor):
        """Implicit deconvolution (§4.5.1): ``W' = D w`` per block and ``b' = b - mu^T D w``."""
        G, nb, fb = self.groups, self._blocks, self._fb
        O = self.out_channels
        w = self.weight.reshape(G, O // G, nb * fb).to(D.dtype)
        if self.grouping == "reference":
            wv = w.reshape(G, O // G, fb, nb)  # [g, o, feature, block]
            wf = torch.matmul(D[:, 0][:, None], wv)  # D[g] @ w[g, o]   (fb x fb) (fb x nb)
            corr = torch.einsum("gf,gofc->go", mean[:, 0], wf)
        else:
            wv = w.reshape(G, O // G, nb, fb)  # [g, o, block, feature]
            wf = torch.einsum("gcfe,goce->gocf", D, wv)
            corr = torch.einsum("gcf,gocf->go", mean, wf)
        weight = wf.reshape(self.weight.shape).to(self.weight.dtype)
        corr = corr.reshape(O)
        bias = -corr if self.bias is None else self.bias.to(corr.dtype) - corr
        return weight, bias.to(self.weight.dtype)

    # ---- forward ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, D = self.batch_statistics(x)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_deconv.lerp_(D.detach().to(self.running_deconv.dtype), m)
                self.num_batches_tracked += 1
        else:
            mean, D = self.running_mean, self.running_deconv
        weight, bias = self.folded_weights(mean, D)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


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
        t = torch.as_tensor(x)
        super().update(t)
        self.device = t.device
        return self

    def covariance(self, eps=0.0):
        """``(cov, mean)`` tensors shaped as :func:`nsiter.patch_covariance` returns them."""
        cov, mean = super().covariance(eps)
        dev = self.device if self.device is not None else torch.device("cpu")
        return torch.as_tensor(cov, device=dev), torch.as_tensor(mean, device=dev)
