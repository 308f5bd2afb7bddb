"""Synchronised deconvolution: two gloo ranks holding half a batch each equal one process on the whole batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
import nsiter.torch as nt  # noqa: E402

WORKER = Path(__file__).with_name("_sync_worker.py")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The workers' reports: ``{case: {quantity: relative difference}}`` per rank."""
    tmp = tmp_path_factory.mktemp("sync")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = [tmp / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(tmp / "init"), str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two gloo ranks did not finish within 300 s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return [json.loads(o.read_text()) for o in outs]


def test_two_ranks_equal_one_process(two_ranks):
    """Outputs, input and weight gradients, running statistics: <= 1e-12 relative in float64."""
    worst = {}
    for report in two_ranks:
        for case, errs in report.items():
            if case == "unsynchronised":
                continue
            for what, e in errs.items():
                worst[(case, what)] = max(e, worst.get((case, what), 0.0))
    assert len(worst) > 100
    bad = {k: v for k, v in worst.items() if not v <= 1e-12}
    assert not bad, bad


def test_local_statistics_differ(two_ranks):
    """The check has teeth: the same layers with local statistics are far from the whole batch."""
    for report in two_ranks:
        assert len(report["unsynchronised"]) == 9
        assert min(report["unsynchronised"].values()) > 1e-4, report["unsynchronised"]


def test_convert_sync_deconv_marks_every_layer():
    net = torch.nn.Sequential(nt.Deconv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              nt.ChannelDeconv(2), nt.Delinear(4, 2))
    assert not any(m.sync for m in net.modules() if hasattr(m, "sync"))
    assert nt.convert_sync_deconv(net) is net
    layers = [m for m in net.modules() if hasattr(m, "sync")]
    assert len(layers) == 3 and all(m.sync and m.process_group is None for m in layers)
    assert "sync=True" in repr(net)


def test_sync_without_distributed_is_local():
    """As SyncBatchNorm: with torch.distributed not initialised a synchronised layer computes local statistics."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    plain = nt.Deconv2d(3, 4, 3, dtype=torch.float64)
    synced = nt.convert_sync_deconv(nt.Deconv2d(3, 4, 3, dtype=torch.float64))
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(plain(x), synced(x))
    assert torch.equal(plain.running_deconv, synced.running_deconv)


@pytest.mark.parametrize("layer", [lambda g: nt.Deconv2d(3, 4, 3, process_group=g),
                                   lambda g: nt.ChannelDeconv(2, process_group=g),
                                   lambda g: nt.Delinear(4, 2, process_group=g)])
def test_process_group_type_is_checked(layer):
    with pytest.raises(TypeError, match="ProcessGroup"):
        layer("world")
