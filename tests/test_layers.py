"""nsiter.torch layers against the reference code's semantics: Deconv2d (FastDeconv), ChannelDeconv, Delinear,
convert_to_deconv.

The ``Ref*`` modules below are an independent transcription of the behaviour of the reference layers of Ye et al.
2020 (``models/deconv.py`` of the paper's repository: ``FastDeconv``, ``ChannelDeconv``, ``Delinear``,
``isqrt_newton_schulz_autograd(_batch)``), written for these tests in today's torch API (``addmm`` keywords) and
float64.  Parity means relative error (max |a - b| / max |b|) at most 1e-12 for outputs, input / weight / bias
gradients and running buffers, in training and eval.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nsiter  # noqa: E402
import nsiter.torch as nt  # noqa: E402
from nsiter import NsiterWarning  # noqa: E402
from nsiter.newton_schulz import METHODS  # noqa: E402

F = torch.nn.functional
nn = torch.nn
F64 = torch.float64
RTOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------------------ the reference semantics

def ref_isqrt(A, n_iter):
    """Reference ``isqrt_newton_schulz_autograd``: Frobenius scaling, ``n_iter`` coupled steps."""
    I = torch.eye(A.shape[0], dtype=A.dtype)
    normA = A.norm()
    Y, Z = A / normA, I.clone()
    for _ in range(n_iter):
        T = 0.5 * (3.0 * I - Z @ Y)
        Y, Z = Y @ T, T @ Z
    return Z / torch.sqrt(normA)


def ref_isqrt_batch(A, n_iter):
    """Reference ``isqrt_newton_schulz_autograd_batch`` on ``(G, n, n)``."""
    normA = A.reshape(A.shape[0], -1).norm(dim=1).view(-1, 1, 1)
    I = torch.eye(A.shape[1], dtype=A.dtype).expand_as(A)
    Y, Z = A / normA, I
    for _ in range(n_iter):
        T = 0.5 * (3.0 * I - Z.bmm(Y))
        Y, Z = Y.bmm(T), T.bmm(Z)
    return Z / torch.sqrt(normA)


class RefFastDeconv(nn.Module):
    """The reference ``FastDeconv`` (square kernels): block rule, 1x1 flat sampling, freeze counter, groups."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, eps=1e-5, n_iter=5, momentum=0.1, block=64, sampling_stride=3, freeze=False,
                 freeze_iter=100):
        super().__init__()
        self.k, self.stride, self.padding, self.dilation, self.groups = kernel_size, stride, padding, dilation, groups
        self.momentum, self.n_iter, self.eps = momentum, n_iter, eps
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels // groups, kernel_size, kernel_size,
                                               dtype=F64) * 0.3)
        self.bias = nn.Parameter(torch.randn(out_channels, dtype=F64) * 0.1)
        if block > in_channels:
            block = in_channels
        elif in_channels % block:
            block = math.gcd(block, in_channels)
        if groups > 1:
            block = in_channels // groups
        self.block = block
        self.num_features = kernel_size ** 2 * block
        if groups == 1:
            self.register_buffer("running_mean", torch.zeros(self.num_features, dtype=F64))
            self.register_buffer("running_deconv", torch.eye(self.num_features, dtype=F64))
        else:
            self.register_buffer("running_mean", torch.zeros(kernel_size ** 2 * in_channels, dtype=F64))
            self.register_buffer("running_deconv",
                                 torch.eye(self.num_features, dtype=F64).repeat(in_channels // block, 1, 1))
        self.sampling_stride = sampling_stride * stride
        self.counter, self.freeze_iter, self.freeze = 0, freeze_iter, freeze
        self.track_running_stats = True

    def forward(self, x):
        N, C, H, W = x.shape
        B, nf, s = self.block, self.num_features, self.sampling_stride
        frozen = self.freeze and (self.counter > self.freeze_iter)
        if self.training and self.track_running_stats:
            self.counter += 1
            self.counter %= self.freeze_iter * 10
        if self.training and not frozen:
            if self.k > 1:
                X = F.unfold(x, self.k, self.dilation, self.padding, s).transpose(1, 2).contiguous()
            else:
                X = x.permute(0, 2, 3, 1).contiguous().view(-1, C)[::s ** 2, :]
            if self.groups == 1:
                X = X.view(-1, nf, C // B).transpose(1, 2).contiguous().view(-1, nf)
            else:
                X = X.view(-1, X.shape[-1])
            X_mean = X.mean(0)
            X = X - X_mean.unsqueeze(0)
            if self.groups == 1:
                Id = torch.eye(X.shape[1], dtype=X.dtype)
                Cov = torch.addmm(Id, X.t(), X, beta=self.eps, alpha=1.0 / X.shape[0])
                deconv = ref_isqrt(Cov, self.n_iter)
            else:
                X = X.view(-1, self.groups, nf).transpose(0, 1)
                Id = torch.eye(nf, dtype=X.dtype).expand(self.groups, nf, nf)
                Cov = torch.baddbmm(Id, X.transpose(1, 2), X, beta=self.eps, alpha=1.0 / X.shape[1])
                deconv = ref_isqrt_batch(Cov, self.n_iter)
            if self.track_running_stats:
                self.running_mean.mul_(1 - self.momentum).add_(X_mean.detach() * self.momentum)
                self.running_deconv.mul_(1 - self.momentum).add_(deconv.detach() * self.momentum)
        else:
            X_mean, deconv = self.running_mean, self.running_deconv
        if self.groups == 1:
            w = self.weight.view(-1, nf, C // B).transpose(1, 2).contiguous().view(-1, nf) @ deconv
            b = self.bias - (w @ X_mean.unsqueeze(1)).view(self.weight.shape[0], -1).sum(1)
            w = w.view(-1, C // B, nf).transpose(1, 2).contiguous()
        else:
            w = self.weight.view(C // B, -1, nf) @ deconv
            b = self.bias - (w @ X_mean.view(-1, nf, 1)).view(self.bias.shape)
        return F.conv2d(x, w.view(self.weight.shape), b, self.stride, self.padding, self.dilation, self.groups)


class RefChannelDeconv(nn.Module):
    """The reference ``ChannelDeconv`` (with ``sampling_stride``): uncentred second moment, remainder standardised."""

    def __init__(self, block, eps=1e-2, n_iter=5, momentum=0.1, sampling_stride=3):
        super().__init__()
        self.eps, self.n_iter, self.momentum, self.block, self.sampling_stride = eps, n_iter, momentum, block, \
            sampling_stride
        self.register_buffer("running_mean1", torch.zeros(block, 1, dtype=F64))
        self.register_buffer("running_deconv", torch.eye(block, dtype=F64))
        self.register_buffer("running_mean2", torch.zeros(1, 1, dtype=F64))
        self.register_buffer("running_var", torch.ones(1, 1, dtype=F64))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        x_shape = x.shape
        if x.ndim == 2:
            x = x.view(x.shape[0], x.shape[1], 1, 1)
        N, C, H, W = x.size()
        B, s, m = self.block, self.sampling_stride, self.momentum
        c = int(C / B) * B
        x1 = (x[:, :c] if c != C else x).permute(1, 0, 2, 3).contiguous().view(B, -1)
        sub = s > 1 and H >= s and W >= s
        x1_s = x1[:, ::s ** 2] if sub else x1
        mean1 = x1_s.mean(-1, keepdim=True)
        if self.num_batches_tracked == 0:
            self.running_mean1.copy_(mean1.detach())
        if self.training:
            self.running_mean1.mul_(1 - m).add_(mean1.detach() * m)
        else:
            mean1 = self.running_mean1
        x1 = x1 - mean1
        if self.training:
            cov = x1_s @ x1_s.t() / x1_s.shape[1] + self.eps * torch.eye(B, dtype=x.dtype)
            deconv = ref_isqrt(cov, self.n_iter)
        if self.num_batches_tracked == 0:
            self.running_deconv.copy_(deconv.detach())
        if self.training:
            self.running_deconv.mul_(1 - m).add_(deconv.detach() * m)
        else:
            deconv = self.running_deconv
        x1 = (deconv @ x1).view(c, N, H, W).contiguous().permute(1, 0, 2, 3)
        if c != C:
            x_tmp = x[:, c:].reshape(N, -1)
            x_s = x_tmp[:, ::s ** 2] if sub else x_tmp
            mean2, var = x_s.mean(), x_s.var()
            if self.num_batches_tracked == 0:
                self.running_mean2.copy_(mean2.detach())
                self.running_var.copy_(var.detach())
            if self.training:
                self.running_mean2.mul_(1 - m).add_(mean2.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * m)
            else:
                mean2, var = self.running_mean2, self.running_var
            x1 = torch.cat([x1, (x[:, c:] - mean2) / (var + self.eps).sqrt()], dim=1)
        if self.training:
            self.num_batches_tracked.add_(1)
        return x1.reshape(x_shape) if len(x_shape) == 2 else x1


class RefDelinear(nn.Module):
    """The reference ``Delinear``: contiguous chunks of ``block`` inputs share one covariance."""

    def __init__(self, in_features, out_features, eps=1e-5, n_iter=5, momentum=0.1, block=512):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features, dtype=F64) * 0.3)
        self.bias = nn.Parameter(torch.randn(out_features, dtype=F64) * 0.1)
        if block > in_features:
            block = in_features
        elif in_features % block:
            block = math.gcd(block, in_features)
        self.block, self.momentum, self.n_iter, self.eps = block, momentum, n_iter, eps
        self.register_buffer("running_mean", torch.zeros(block, dtype=F64))
        self.register_buffer("running_deconv", torch.eye(block, dtype=F64))

    def forward(self, x):
        if self.training:
            X = x.reshape(-1, self.block)
            X_mean = X.mean(0)
            X = X - X_mean.unsqueeze(0)
            self.running_mean.mul_(1 - self.momentum).add_(X_mean.detach() * self.momentum)
            Id = torch.eye(X.shape[1], dtype=X.dtype)
            Cov = torch.addmm(Id, X.t(), X, beta=self.eps, alpha=1.0 / X.shape[0])
            deconv = ref_isqrt(Cov, self.n_iter)
            self.running_deconv.mul_(1 - self.momentum).add_(deconv.detach() * self.momentum)
        else:
            X_mean, deconv = self.running_mean, self.running_deconv
        w = self.weight.view(-1, self.block) @ deconv
        b = self.bias - (w @ X_mean.unsqueeze(1)).view(self.weight.shape[0], -1).sum(1)
        return F.linear(x, w.view(self.weight.shape), b)


# ------------------------------------------------------------------------------ helpers

def twin_deconv(ref: RefFastDeconv, **kw) -> nt.Deconv2d:
    layer = nt.Deconv2d(ref.weight.shape[1] * ref.groups, ref.weight.shape[0], ref.k, ref.stride, ref.padding,
                        ref.dilation, ref.groups, eps=ref.eps, n_iter=ref.n_iter, momentum=ref.momentum,
                        sampling_stride=ref.sampling_stride // ref.stride, dtype=F64, **kw)
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    return layer


def step_both(a, b, x, params=("weight", "bias")):
    """One forward + backward of ``a`` and ``b`` on the same input; relative errors of y, dx and parameter grads."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    R = torch.randn(yb.shape, dtype=F64, generator=torch.Generator().manual_seed(ya.numel()))
    (ya * R).sum().backward()
    (yb * R).sum().backward()
    errs = {"y": rel(ya, yb), "dx": rel(xa.grad, xb.grad)}
    for p in params:
        errs["d" + p] = rel(getattr(a, p).grad, getattr(b, p).grad)
        getattr(a, p).grad = getattr(b, p).grad = None
    return errs


def assert_parity(errs, what=""):
    worst = max(errs.values())
    assert worst <= RTOL, f"{what}: {errs}"


DECONV_CASES = [
    dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, block=2),            # 2 interleaved blocks
    dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, block=4),
    dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1, block=64),  # block clamped
    dict(in_channels=8, out_channels=4, kernel_size=3, padding=2, dilation=2, block=4),
    dict(in_channels=4, out_channels=6, kernel_size=5, padding=2, sampling_stride=2, block=4),  # overlapping
    dict(in_channels=6, out_channels=4, kernel_size=3, padding=1, groups=2),           # grouped: block = C / G
    dict(in_channels=8, out_channels=4, kernel_size=3, padding=1, groups=4, stride=2),
    dict(in_channels=6, out_channels=4, kernel_size=1, stride=2, block=3, sampling_stride=2),  # 1x1 flat sampling
    dict(in_channels=4, out_channels=4, kernel_size=1, groups=2, sampling_stride=1),
    dict(in_channels=8, out_channels=4, kernel_size=1, block=2),
]


def make_pair(case, **kw):
    torch.manual_seed(1)
    ref = RefFastDeconv(**case)
    block = None if ref.groups > 1 else ref.block
    return ref, twin_deconv(ref, block_size=block, sampling="reference", **kw)


# ------------------------------------------------------------------------------ Deconv2d parity

@pytest.mark.parametrize("case", DECONV_CASES)
def test_deconv2d_equals_the_reference_fastdeconv_in_training_eval_and_gradients(case):
    ref, layer = make_pair(case)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(3, ref.weight.shape[1] * ref.groups, 11, 10, dtype=F64, generator=gen) * 2 + 0.5
        assert_parity(step_both(layer, ref, x), f"train {case}")
    flat_mean = layer.running_mean.reshape(ref.running_mean.shape)
    assert rel(flat_mean, ref.running_mean) <= RTOL
    assert rel(layer.running_deconv.reshape(ref.running_deconv.shape), ref.running_deconv) <= RTOL
    layer.eval(), ref.eval()
    assert_parity(step_both(layer, ref, torch.randn(2, x.shape[1], 9, 7, dtype=F64, generator=gen)), f"eval {case}")


def test_deconv2d_freeze_follows_the_reference_counter():
    case = dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, freeze=True, freeze_iter=2)
    torch.manual_seed(3)
    ref = RefFastDeconv(**case)
    layer = twin_deconv(ref, freeze=True, freeze_iter=2)
    gen = torch.Generator().manual_seed(4)
    frozen_steps = []
    for step in range(23):  # period 10 freeze_iter = 20: batch statistics at steps 0-2 and 20-22
        x = torch.randn(2, 3, 8, 8, dtype=F64, generator=gen)
        before = layer.running_deconv.clone()
        assert_parity(step_both(layer, ref, x), f"step {step}")
        if torch.equal(before, layer.running_deconv):
            frozen_steps.append(step)
    assert frozen_steps == list(range(3, 20))
    assert int(layer.num_batches_tracked) == 23
    assert rel(layer.running_deconv[0, 0], ref.running_deconv) <= RTOL
    # a frozen training step sends no gradient through the statistics: it is a plain convolution
    for _ in range(5):
        layer(torch.randn(2, 3, 8, 8, dtype=F64))
    assert layer._frozen()
    w, b = layer.folded_weights(layer.running_mean, layer.running_deconv)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, b, padding=1), rtol=0, atol=1e-12)


def test_deconv2d_without_running_stats_behaves_as_batchnorm_does():
    torch.manual_seed(5)
    layer = nt.Deconv2d(4, 3, 3, padding=1, block_size=2, track_running_stats=False, dtype=F64)
    assert layer.running_mean is None and layer.running_deconv is None and layer.num_batches_tracked is None
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 4, 8, 8, dtype=F64)
    y_train = layer(x)
    y_eval = layer.eval()(x)  # eval keeps using the batch statistics
    torch.testing.assert_close(y_eval, y_train, rtol=0, atol=1e-13)
    mean, D = layer.batch_statistics(x)
    w, b = layer.folded_weights(mean, D)
    torch.testing.assert_close(y_eval, F.conv2d(x, w, b, padding=1), rtol=0, atol=1e-12)
    ref = RefFastDeconv(4, 3, 3, padding=1, block=2)
    ref.track_running_stats = False  # the reference flag: no update, batch statistics in training
    twin = twin_deconv(ref, block_size=2, track_running_stats=False)
    assert_parity(step_both(twin, ref, x), "train, no running stats")
    with pytest.raises(ValueError, match="freeze=True uses the running statistics"):
        nt.Deconv2d(4, 3, 3, freeze=True, track_running_stats=False)


def test_deconv2d_groups_take_the_reference_block_unless_told_otherwise():
    torch.manual_seed(6)
    ref = RefFastDeconv(16, 8, 3, groups=2, block=4)  # the reference ignores block=4: whole groups of 8
    layer = twin_deconv(ref)
    assert layer.block_size == 8
    assert_parity(step_both(layer, ref, torch.randn(2, 16, 7, 7, dtype=F64)), "groups=2")
    with pytest.warns(NsiterWarning, match=r"blocks of 4 channels inside each group of 8.*block_size=None"):
        nt.Deconv2d(16, 8, 3, groups=2, block_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nt.Deconv2d(16, 8, 3, groups=2, block_size=64).block_size == 8  # clamped: the reference rule


def test_deconv2d_grid_sampling_of_1x1_kernels_differs_from_the_reference_option():
    torch.manual_seed(7)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    grid = nt.Deconv2d(4, 2, 1, sampling_stride=3, dtype=F64)
    flat = copy.deepcopy(grid)
    flat.sampling = "reference"
    mg, _ = grid.batch_statistics(x)
    mf, _ = flat.batch_statistics(x)
    torch.testing.assert_close(mg[0, 0], x[:, :, ::3, ::3].mean(dim=(0, 2, 3)), rtol=0, atol=1e-14)
    torch.testing.assert_close(mf[0, 0], x.permute(0, 2, 3, 1).reshape(-1, 4)[::9].mean(0), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="unknown sampling 'flat'; choose one of: 'grid', 'reference'"):
        nt.Deconv2d(4, 2, 1, sampling="flat")


@pytest.mark.parametrize("groups", [1, 2])
def test_deconv2d_loads_reference_fastdeconv_state_dicts(groups):
    torch.manual_seed(8)
    ref = RefFastDeconv(4, 6, 3, padding=1, groups=groups, block=4 if groups == 1 else 2)
    for _ in range(2):
        ref(torch.randn(2, 4, 8, 8, dtype=F64))
    sd = ref.state_dict()
    assert "num_batches_tracked" not in sd and sd["running_mean"].ndim == 1
    layer = nt.Deconv2d(4, 6, 3, padding=1, groups=groups, dtype=F64)
    layer.load_state_dict(sd)  # strict: shapes converted, counter added
    assert int(layer.num_batches_tracked) == 0
    x = torch.randn(2, 4, 7, 9, dtype=F64)
    assert rel(layer.eval()(x), ref.eval()(x)) <= RTOL
    clone = nt.Deconv2d(4, 6, 3, padding=1, groups=groups, dtype=F64)
    clone.load_state_dict(layer.state_dict())  # nsiter's own layout
    torch.testing.assert_close(clone.eval()(x), layer(x), rtol=0, atol=0)
    wrong = nt.Deconv2d(4, 6, 3, padding=1, groups=groups, block_size=1 if groups == 1 else None,
                        grouping="contiguous", dtype=F64)
    if groups == 1:
        with pytest.raises(RuntimeError, match="size mismatch for running_deconv"):
            wrong.load_state_dict(sd)


def test_deconv2d_training_output_keeps_the_input_memory_format():
    layer = nt.Deconv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    y = layer(x)
    assert y.is_contiguous()
    ycl = layer(x.contiguous(memory_format=torch.channels_last))
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ycl, y, rtol=1e-5, atol=1e-5)
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    layer(xcl).sum().backward()  # unpadded channels-last input: the statistics read it without a copy
    assert xcl.grad.shape == x.shape


def test_deconv2d_accepts_huge_finite_batches():
    layer = nt.Deconv2d(2, 2, 1, sampling_stride=1, eps=0.0)
    x = torch.full((1, 2, 4, 4), 3e37)  # the sum overflows to inf: the exact check decides
    x[0, 1] *= -0.5
    assert layer.eval()(x).isfinite().all()


def test_deconv2d_and_moments_pass_gradcheck_with_overlapping_patches():
    torch.manual_seed(9)
    layer = nt.Deconv2d(2, 2, 3, padding=1, sampling_stride=1, block_size=1, n_iter=3, dtype=F64)
    x = torch.randn(2, 2, 5, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), fast_mode=True)
    inter = nt.Deconv2d(4, 2, 3, padding=1, sampling_stride=2, block_size=2, n_iter=3, dtype=F64)  # columns path
    x4 = torch.randn(2, 4, 5, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: inter.batch_statistics(t)[1], (x4,), fast_mode=True)


# ------------------------------------------------------------------------------ every inv_sqrtm method

@pytest.mark.parametrize("method", METHODS)
def test_layer_statistics_are_nsiter_covariance_and_inv_sqrtm(method):
    torch.manual_seed(10)
    x = torch.randn(3, 4, 9, 9, dtype=F64) + 1.0
    layer = nt.Deconv2d(4, 3, 3, padding=1, block_size=2, eps=1e-3, method=method, n_iter=8, dtype=F64)
    mean, D = layer.batch_statistics(x)
    cov, mu = nsiter.patch_covariance(x, 3, padding=1, sampling_stride=3, block_size=2, grouping="reference",
                                      eps=1e-3)
    want = nsiter.inv_sqrtm(cov, method=method, n_iter=8)
    assert rel(mean.reshape(mu.shape), mu) <= RTOL and rel(D.reshape(want.shape), want) <= 1e-10
    lin = nt.Delinear(6, 2, block=3, eps=1e-3, method=method, n_iter=8, dtype=F64)
    z = torch.randn(20, 6, dtype=F64)
    lin(z)
    c2, m2 = nsiter.covariance(z.reshape(-1, 3), eps=1e-3)
    assert rel(lin.running_mean, 0.1 * m2) <= RTOL
    eye = torch.eye(3, dtype=F64)
    assert rel(lin.running_deconv, 0.9 * eye + 0.1 * nsiter.inv_sqrtm(c2, method=method, n_iter=8)) <= 1e-10
    ch = nt.ChannelDeconv(3, eps=1e-3, method=method, n_iter=8, covariance="centred", dtype=F64)
    ch(z)
    c3, _ = nsiter.covariance(z[:, :6].reshape(20, 3, 2).permute(0, 2, 1).reshape(-1, 3), eps=1e-3)
    assert rel(ch.running_deconv, nsiter.inv_sqrtm(c3, method=method, n_iter=8)) <= 1e-10


# ------------------------------------------------------------------------------ ChannelDeconv

CHANNEL_CASES = [
    dict(shape=(4, 8, 6, 5), block=4, sampling_stride=3),   # divisible, subsampled
    dict(shape=(4, 10, 6, 5), block=4, sampling_stride=3),  # 2 remaining channels normalised
    dict(shape=(3, 7, 2, 2), block=3, sampling_stride=3),   # H, W < stride: every pixel
    dict(shape=(16, 10), block=4, sampling_stride=3),       # 2-D features
    dict(shape=(16, 9), block=9, sampling_stride=1),
]


@pytest.mark.parametrize("case", CHANNEL_CASES)
def test_channel_deconv_equals_the_reference(case):
    shape, kw = case["shape"], {k: v for k, v in case.items() if k != "shape"}
    ref, layer = RefChannelDeconv(**kw), nt.ChannelDeconv(**kw, dtype=F64)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        x = torch.randn(shape, dtype=F64, generator=gen) * 1.5 + 0.7
        assert_parity(step_both(layer, ref, x, params=()), f"train {case}")
    for name, buf in ref.named_buffers():
        assert rel(getattr(layer, name), buf) <= RTOL, name
    layer.eval(), ref.eval()
    assert_parity(step_both(layer, ref, torch.randn(shape, dtype=F64, generator=gen), params=()), f"eval {case}")
    fresh = nt.ChannelDeconv(**kw, dtype=F64)
    fresh.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=F64, generator=gen)
    assert rel(fresh.eval()(x), ref(x)) <= RTOL


def test_channel_deconv_centred_option_whitens_the_covariance():
    torch.manual_seed(12)
    x = torch.randn(64, 6, dtype=F64) * 2 + 3.0
    for covariance in ("uncentred", "centred"):
        layer = nt.ChannelDeconv(6, eps=0.0, n_iter=30, covariance=covariance, dtype=F64)
        y = layer(x)  # y = D (x - mu)
        D = layer.running_deconv
        M = torch.cov(y.T, correction=0) if covariance == "centred" else D @ (x.T @ x / 64) @ D
        torch.testing.assert_close(M, torch.eye(6, dtype=F64), rtol=0, atol=1e-8)
    assert layer.extra_repr().endswith("covariance='centred'")


def test_channel_deconv_errors_and_untrained_eval():
    layer = nt.ChannelDeconv(4)
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(layer.eval()(x), torch.cat([x[:, :4], x[:, 4:] / math.sqrt(1.01)], 1))
    with pytest.raises(ValueError, match=r"needs at least 4 channels.*use block <= 3"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C\) or \(N, C, H, W\)"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="unknown covariance"):
        nt.ChannelDeconv(4, covariance="central")
    with pytest.raises(ValueError, match="NaN or inf in training mode"):
        layer.train()(torch.full((2, 4), float("nan")))


# ------------------------------------------------------------------------------ Delinear

@pytest.mark.parametrize("in_features, block, lead", [(12, 4, (10,)), (12, 12, (10,)), (6, 512, (4, 5))])
def test_delinear_equals_the_reference(in_features, block, lead):
    torch.manual_seed(13)
    ref = RefDelinear(in_features, 3, block=block)
    layer = nt.Delinear(in_features, 3, block=block, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    gen = torch.Generator().manual_seed(14)
    for _ in range(3):
        x = torch.randn(*lead, in_features, dtype=F64, generator=gen) + 0.3
        assert_parity(step_both(layer, ref, x), "train")
    assert rel(layer.running_mean, ref.running_mean) <= RTOL
    assert rel(layer.running_deconv, ref.running_deconv) <= RTOL
    layer.eval(), ref.eval()
    assert_parity(step_both(layer, ref, torch.randn(*lead, in_features, dtype=F64, generator=gen)), "eval")
    fresh = nt.Delinear(in_features, 3, block=block, dtype=F64)
    fresh.load_state_dict(ref.state_dict())  # no num_batches_tracked in the reference
    assert int(fresh.num_batches_tracked) == 0
    x = torch.randn(*lead, in_features, dtype=F64)
    assert rel(fresh.eval()(x), ref(x)) <= RTOL


def test_delinear_gradcheck_and_errors():
    layer = nt.Delinear(4, 2, block=2, n_iter=3, dtype=F64)
    x = torch.randn(6, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), fast_mode=True)
    with pytest.raises(ValueError, match=r"block 4 does not divide in_features=6; use block=2 \(gcd\(4, 6\)\)"):
        nt.Delinear(6, 2, block=4)
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 4\)"):
        layer(torch.randn(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="unknown method"):
        nt.Delinear(4, 2, method="newton")
    with pytest.raises(ValueError, match="expected tol > 0"):
        nt.Delinear(4, 2, tol=0.0)


# ------------------------------------------------------------------------------ convert_to_deconv

class _Block(nn.Module):
    """A torchvision-style basic block: conv-bn-relu-conv-bn + a 1x1 conv-bn downsample."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class _TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = _Block(8, 96, 2)  # 96 channels: block gcd(64, 96) = 32
        self.depthwise = nn.Conv2d(96, 96, 3, padding="same", groups=48)
        self.fc = nn.Linear(96, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.depthwise(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_convert_to_deconv_applies_the_papers_recipe_and_carries_the_weights():
    torch.manual_seed(15)
    model = _TinyResNet()
    net = nt.convert_to_deconv(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # a copy was converted
    deconvs = {n: m for n, m in net.named_modules() if isinstance(m, nt.Deconv2d)}
    assert set(deconvs) == {"conv1", "layer1.conv1", "layer1.conv2", "layer1.downsample.0", "depthwise"}
    assert {n: m.block_size for n, m in deconvs.items()} == {"conv1": 3, "layer1.conv1": 8, "layer1.conv2": 32,
                                                             "layer1.downsample.0": 8, "depthwise": 2}
    assert deconvs["depthwise"].padding == (1, 1)
    assert isinstance(net.fc, nt.Delinear) and net.fc.block == 96
    for name, m in deconvs.items():
        src = model.get_submodule(name)
        torch.testing.assert_close(m.weight, src.weight, rtol=0, atol=0)
        torch.testing.assert_close(m.bias, torch.zeros(m.out_channels) if src.bias is None else src.bias)
        assert (m.stride, m.groups) == (src.stride, src.groups)
    torch.testing.assert_close(net.fc.weight, model.fc.weight, rtol=0, atol=0)
    x = torch.randn(8, 3, 12, 12)
    target = torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert net.eval()(x).shape == (8, 5)
    keep = nt.convert_to_deconv(model, linear=False, block_size=16, sampling_stride=2, n_iter=7)
    assert type(keep.fc) is nn.Linear and keep.layer1.conv2.block_size == 16 and keep.conv1.n_iter == 7
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        nt.convert_to_deconv(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")))


def test_layers_repr_and_state_dict_keys():
    d = nt.Deconv2d(4, 4, 3, freeze=True, sampling="reference", method="eigh")
    r = repr(d)
    assert "freeze=True, freeze_iter=100" in r and "sampling='reference'" in r and "method='eigh'" in r
    assert "track_running_stats=False" in repr(nt.Deconv2d(4, 4, 3, track_running_stats=False))
    assert set(nt.ChannelDeconv(4).state_dict()) == {"running_mean1", "running_deconv", "running_mean2",
                                                     "running_var", "num_batches_tracked"}
    assert "block=4" in repr(nt.Delinear(8, 2, block=4))
    np.testing.assert_array_equal(nt.Delinear(8, 2).running_deconv.numpy(), np.eye(8))


def test_torch_patch_statistics_refuses_a_masked_array_instead_of_unmasking_it():
    x = np.ma.masked_array(np.ones((1, 1, 4, 4)), mask=np.zeros((1, 1, 4, 4), dtype=bool))
    with pytest.raises(TypeError, match="masked"):
        nt.PatchStatistics(2).update(x)
