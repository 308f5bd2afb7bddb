"""One rank of the synchronised-deconvolution check (run by tests/test_sync.py, two processes, gloo).

``python _sync_worker.py RANK WORLD INIT_FILE OUT_JSON``: every case builds the same layer (or
model) on every rank, a plain copy of it runs one process on the whole batch, and a copy made
synchronous by :func:`nsiter.torch.convert_sync_deconv` runs on this rank's share of the batch.
Two training steps and one eval step; the worker writes, per case and quantity, the relative
difference ``||sync - whole|| / ||whole||`` (outputs and input gradients on this rank's share,
weight gradients summed over the ranks, running buffers), and the output difference of the
same layer with local statistics (key ``"unsynchronised"``: it must be far from zero, or the check
proves nothing).
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

import nsiter.torch as nt


def _cases():
    """``(name, factory, input shape)``; the factories are called under the same seed on every rank."""
    def model():
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
        return nt.convert_to_deconv(net, block_size=2, sampling_stride=1)

    return [
        ("deconv2d contiguous blocks", lambda: nt.Deconv2d(4, 6, 3, padding=1, block_size=2,
                                                           grouping="contiguous"), (8, 4, 9, 9)),
        ("deconv2d groups=2 strided", lambda: nt.Deconv2d(8, 8, 3, stride=2, padding=1, groups=2,
                                                          sampling_stride=2), (6, 8, 11, 11)),
        ("deconv2d reference blocks auto", lambda: nt.Deconv2d(4, 4, 3, block_size=2, method="auto", tol=1e-8,
                                                                         n_iter=40),
         (4, 4, 8, 8)),
        ("deconv2d 1x1 reference sampling", lambda: nt.Deconv2d(4, 4, 1, sampling="reference"), (4, 4, 6, 6)),
        ("channel deconv 4-D remainder", lambda: nt.ChannelDeconv(3), (8, 7, 6, 6)),
        ("channel deconv 2-D centred", lambda: nt.ChannelDeconv(3, covariance="centred"), (8, 7)),
        ("delinear", lambda: nt.Delinear(6, 4, block=3), (8, 6)),
        ("delinear 3-D input", lambda: nt.Delinear(6, 4), (4, 5, 6)),
        ("converted model", model, (8, 3, 8, 8)),
    ]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.norm())
    return float((a - b).norm()) / (scale if scale > 0 else 1.0)


def _step(layer, x, training, r=None, g=None):
    """A forward and the backward of ``sum(y * r)`` (``r`` drawn from ``g`` when not given)."""
    layer.train(training)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    if r is None:
        r = torch.randn(y.shape, generator=g)
    (y * r).sum().backward()
    return y.detach(), x.grad, r


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    errors = {}
    for name, factory, shape in _cases():
        torch.manual_seed(0)
        whole = factory()
        sync = nt.convert_sync_deconv(copy.deepcopy(whole))
        local = copy.deepcopy(whole)  # local statistics: what the synchronisation must change
        n = shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        err = errors.setdefault(name, {})
        for step, training in enumerate((True, True, False)):
            g = torch.Generator().manual_seed(100 + step)
            x = torch.randn(shape, generator=g) * 2.0 + 0.5
            whole.zero_grad()
            sync.zero_grad()
            y_whole, gx_whole, r = _step(whole, x, training, g=g)
            y_sync, gx_sync, _ = _step(sync, x[part], training, r[part])
            err[f"step {step} output"] = _rel(y_sync, y_whole[part])
            if step == 0:
                errors.setdefault("unsynchronised", {})[name] = _rel(_step(local, x[part], True, r[part])[0],
                                                                     y_whole[part])
            err[f"step {step} input grad"] = _rel(gx_sync, gx_whole[part])
            # a gradient that vanishes in exact arithmetic (a bias before a layer that removes the mean)
            # holds only rounding: it is judged against the scale of the whole gradient
            total = float(torch.cat([p.grad.reshape(-1) for p in whole.parameters()] + [torch.zeros(1)]).norm())
            for (pname, p_whole), p_sync in zip(whole.named_parameters(), sync.parameters()):
                grad = p_sync.grad.clone()
                dist.all_reduce(grad)
                scale = float(p_whole.grad.norm())
                scale = scale if scale > 1e-10 * total else total
                err[f"step {step} grad {pname}"] = float((grad - p_whole.grad).norm()) / scale
            for (bname, b_whole), b_sync in zip(whole.named_buffers(), sync.buffers()):
                if b_whole.is_floating_point():
                    err[f"step {step} buffer {bname}"] = _rel(b_sync, b_whole)
                else:
                    err[f"step {step} buffer {bname}"] = float(not torch.equal(b_sync, b_whole))
    dist.barrier()
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(errors, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
