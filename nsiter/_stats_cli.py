"""``nsiter stats SOURCE...``: the command-line face of :func:`nsiter.dataset_statistics`.

What it reads, writes and exits with: ``_DESCRIPTION`` and ``_EPILOG`` (its ``--help``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

import numpy as np

from ._cli_common import EXIT_OK, _UsageError, internal_error, one_line as _one_line, write_stdout
from .covariance import GROUPINGS, PatchStatistics, write_npz_atomic
from .dataset import DASK_INSTALL_HINT, LOCAL_SCHEDULERS, dataset_statistics
from .newton_schulz import METHODS, inv_sqrtm
from .whitening import deconvolution_kernel

__all__ = ["add_stats_parser", "kernel_figure", "OUTPUT_KEYS"]

_PROG = "nsiter stats"
#: ``--eps`` when only ``--deconv-kernels`` asks for D: the ridge of the paper's Fig. 2 (and figures/).
DEFAULT_EPS = 1e-5
#: Keys ``nsiter stats`` adds to the shard keys of :meth:`nsiter.PatchStatistics.save`.
OUTPUT_KEYS = ("cov", "mean", "n_images", "deconv", "eps")

_DESCRIPTION = """\
Patch statistics of a whole image dataset (nsiter.dataset_statistics): the images are read
in partitions on Dask (local threads by default, a LocalCluster with --workers, or a running
scheduler with --scheduler), each partition's exact float64 moments are computed, and the
partial results are merged along a tree. The covariance is that of the im2col rows of every
image, (X - mu)^T (X - mu) / N (Ye et al. 2020, Algorithm 1), without the ridge; with --eps or
--deconv-kernels also D = (Cov + eps I)^(-1/2) and a Fig. 2-style picture of its kernels."""

_EPILOG = f"""\
SOURCE: a folder (searched recursively for .png/.jpg/.jpeg/.tif/.tiff/.bmp/.gif/.webp), a glob
  (quote it: 'data/**/*.JPEG') or an image file; several are read in order, repeats once.
  Images: alpha dropped; grey (1 channel) and colour (3) may not mix unless --gray; all must have
  the first image's size unless --image-size H,W (centre crop) or --any-size (each used whole).

OUT (.npz, written to a temporary file and renamed: never half-written):
  cov       covariance, (F, F) float64 (F = C*kh*kw); (G, Fb, Fb) for --block-size with
            contiguous grouping, (Fb, Fb) with reference grouping
  mean      mean patch, (F,) / (G, Fb) / (Fb,)
  count     patch rows accumulated;  n_images  images read in this run
  deconv    D = (cov + eps I)^(-1/2), shaped as cov (only with --eps / --deconv-kernels); eps
  and the shard keys of nsiter.PatchStatistics.save (settings, moments_mean, moments_m2): OUT
  can be merged again with --merge, or read with nsiter.PatchStatistics.load.

exit status: 0 written, 2 bad input or usage (one line on stderr: unreadable images are named),
             3 internal error, 4 stdout closed or not writable

examples:
  nsiter stats photos/ -k 15 --out stats.npz
  nsiter verify stats.npz --key cov --eps 1e-5
  nsiter stats 'shard1/*.png' -k 15 --workers 2 --out part1.npz
  nsiter stats --merge part1.npz part2.npz --out all.npz --deconv-kernels kernels.png
  nsiter stats photos/ -k 3 --block-size 1 --scheduler tcp://10.0.0.1:8786 --out s.npz

Dask is an optional dependency: {DASK_INSTALL_HINT}"""


def _fail(message: str):
    raise _UsageError(f"{_PROG}: {message}")


def _pair(name: str, minimum: int):
    """An argparse type: ``N`` or ``H,W`` (or ``HxW``) of ints ``>= minimum``."""
    def parse(text: str):
        parts = text.replace("x", ",").split(",")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) not in (1, 2) or min(vals) < minimum:
            raise argparse.ArgumentTypeError(f"expected {name} as an integer >= {minimum} or a pair H,W, got {text!r}")
        return vals[0] if len(vals) == 1 else tuple(vals)

    return parse


def _int(name: str, minimum: int):
    def parse(text: str):
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"expected {name} as an integer >= {minimum}, got {text!r}")
        return v

    return parse


def _eps(text: str):
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (e.g. 1e-5), got {text!r}")
    return v


_GEOMETRY = ("stride", "padding", "dilation", "sampling_stride", "block_size", "grouping")


def add_stats_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``stats`` sub-command to ``nsiter``'s sub-parsers (called by :mod:`nsiter.cli`)."""
    p = subparsers.add_parser(
        "stats", help="patch covariance of a folder of images on Dask (and its deconvolution kernels)",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="image folder, glob or file (several allowed)")
    p.add_argument("-k", "--kernel-size", type=_pair("kernel size", 1), metavar="K",
                   help="kernel size K or KH,KW (required with SOURCE; with --merge alone the shards' settings)")
    g = p.add_argument_group("patch geometry (as nsiter.patch_covariance)")
    g.add_argument("--stride", type=_pair("stride", 1), metavar="S", help="default 1")
    g.add_argument("--padding", type=_pair("padding", 0), metavar="P", help="zero padding, default 0")
    g.add_argument("--dilation", type=_pair("dilation", 1), metavar="D", help="default 1")
    g.add_argument("--sampling-stride", type=_int("sampling stride", 1), metavar="S",
                   help="subsample the patch grid by S (paper section 4.5.2), default 1")
    g.add_argument("--block-size", type=_int("block size", 1), metavar="B", help="channels per block (divides C)")
    g.add_argument("--grouping", choices=GROUPINGS, help="channel grouping with --block-size (default contiguous)")
    im = p.add_argument_group("images")
    sizes = im.add_mutually_exclusive_group()
    sizes.add_argument("--image-size", type=_pair("image size", 1), metavar="H,W",
                       help="centre-crop every image to H x W (smaller images are refused by name)")
    sizes.add_argument("--any-size", action="store_true", help="use every image whole, whatever its size")
    im.add_argument("--gray", action="store_true", help="convert every image to one BT.601 luma channel")
    im.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="pixel dtype (moments are float64 either way; default float64)")
    run = p.add_argument_group("where it runs")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDR",
                       help=f"a Dask scheduler address (tcp://host:8786) or one of {', '.join(LOCAL_SCHEDULERS)} "
                            "(default: threads)")
    where.add_argument("--workers", type=_int("workers", 1), metavar="N",
                       help="start a local Dask cluster of N worker processes (one thread each) for this run")
    run.add_argument("--partition-size", type=_int("partition size", 1), metavar="N",
                     help="images per Dask task (default: about 4 tasks per thread, at most 4096 images)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--merge", nargs="+", action="extend", default=[], metavar="SHARD.npz",
                   help="also merge these shards (PatchStatistics.save or nsiter stats outputs)")
    p.add_argument("--out", "-o", required=True, metavar="OUT.npz", help="where to write the statistics")
    d = p.add_argument_group("deconvolution (optional)")
    d.add_argument("--eps", type=_eps, default=None, metavar="E",
                   help=f"also write D = (cov + E*I)^(-1/2) as 'deconv' (default E = {DEFAULT_EPS:g} "
                        "with --deconv-kernels)")
    d.add_argument("--method", choices=METHODS, default="eigh",
                   help="nsiter.inv_sqrtm method for D (default eigh: exact, float64)")
    d.add_argument("--deconv-kernels", metavar="OUT.png",
                   help="also draw the deconvolution kernels (centre rows of D, as Fig. 2 of the paper)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_stats)
    return p


def kernel_figure(K, title: str):
    """A Fig. 2-style grid of deconvolution kernels ``K (C, C, kh, kw)`` (:func:`nsiter.deconvolution_kernel`).

    Panel ``(r, q)`` is the part of output channel ``r``'s kernel that reads input channel ``q``;
    diagonal panels are framed and their colour range excludes the centre tap, which saturates."""
    from matplotlib.figure import Figure

    K = np.asarray(K)
    c = K.shape[0]
    name = (lambda i: "RGB"[i]) if c == 3 else str
    fig = Figure(figsize=(max(2.6 * c, 3.2), max(2.6 * c, 3.2)))
    axes = fig.subplots(c, c, squeeze=False)
    for r in range(c):
        for q in range(c):
            kk = K[r, q]
            mags = np.sort(np.abs(kk).ravel())
            lim = mags[-1] if r != q or mags.size < 2 else mags[-2]  # centre tap saturates
            axes[r, q].imshow(kk, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[r, q].set_xticks([])
            axes[r, q].set_yticks([])
            if r == 0:
                axes[r, q].set_title(f"input {name(q)}")
            if q == 0:
                axes[r, q].set_ylabel(f"output {name(r)}")
        for s in axes[r, r].spines.values():
            s.set_edgecolor("k")
            s.set_linewidth(2)
    fig.suptitle(title, fontsize=10)
    return fig


def _save_figure_atomic(fig, path: str) -> None:
    """``fig.savefig(path)`` through a temporary file renamed into place."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_out(path: str, what: str, formats=None) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        _fail(f"cannot write {what} to {path!r}: directory {parent!r} does not exist; create it or pick another path")
    if os.path.isdir(path):
        _fail(f"cannot write {what} to {path!r}: it is a directory; pass a file name")
    if not os.access(parent, os.W_OK):
        _fail(f"cannot write {what} to {path!r}: directory {parent!r} is not writable")
    if formats is not None:
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        if ext not in formats:
            _fail(f"cannot write {what} to {path!r}: unknown image format {ext!r}; use one of the extensions "
                  f"{', '.join('.' + f for f in sorted(formats))}")


def _cmd_stats(args) -> int:
    try:
        return _run_stats(args)
    except _UsageError:
        raise
    except ImportError as exc:  # Dask missing: the message names the extra to install
        _fail(_one_line(exc))
    except MemoryError:
        _fail("not enough memory; use a smaller --partition-size, --dtype float32 or a smaller kernel")
    except (ValueError, TypeError, OSError) as exc:  # bad images, settings, paths, an unreachable scheduler
        _fail(_one_line(exc))
    except Exception as exc:  # an internal error: one line, exit 3 (the traceback on request)
        return internal_error(_PROG, exc)


def _local_cluster(n: int):
    """A ``distributed.Client`` on a fresh LocalCluster of ``n`` one-thread worker processes, and the cluster."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        _fail(f"--workers needs dask.distributed, which is not installed ({exc}); install it with: "
              f"{DASK_INSTALL_HINT}")
    # the CLI reports task errors itself: keep the workers' logging of them off stderr
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.CRITICAL)
    return Client(cluster), cluster


def _run_stats(args) -> int:
    if not args.sources and not args.merge:
        _fail("nothing to do: pass image SOURCEs and/or --merge SHARD.npz ... (see 'nsiter stats --help')")
    geometry = {k: getattr(args, k) for k in _GEOMETRY if getattr(args, k) is not None}
    if args.kernel_size is None and (args.sources or geometry):
        _fail("pass the kernel size with -k K (e.g. -k 15): it is needed with image SOURCEs and geometry options")
    _check_out(args.out, "the statistics")
    want_d = args.eps is not None or args.deconv_kernels is not None
    if args.deconv_kernels is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        _check_out(args.deconv_kernels, "the kernel picture", FigureCanvasAgg(Figure()).get_supported_filetypes())
    shards = []
    for path in args.merge:  # read (and so check) every shard before the images
        shards.append((path, PatchStatistics.load(path)))
    stats, info, t0 = None, None, time.perf_counter()
    if args.sources:
        image_size = "any" if args.any_size else args.image_size
        kwargs = dict(geometry, image_size=image_size, gray=args.gray, dtype=args.dtype,
                      partition_size=args.partition_size, progress=args.progress, return_info=True)
        if args.workers is not None:
            client, cluster = _local_cluster(args.workers)
            try:
                stats, info = dataset_statistics(args.sources, args.kernel_size, scheduler=client, **kwargs)
            finally:
                client.close()
                cluster.close()
        else:
            stats, info = dataset_statistics(args.sources, args.kernel_size, scheduler=args.scheduler, **kwargs)
    elif args.kernel_size is not None:
        stats = PatchStatistics(args.kernel_size, **geometry)
    for path, shard in shards:
        if stats is None:
            stats = PatchStatistics(**shard._settings())
        try:
            stats.merge(shard)
        except ValueError as exc:
            _fail(f"cannot merge {path!r}: {_one_line(exc)}")
    if stats.count == 0:
        _fail("no statistics: the shards are empty and no images were given")
    cov, mean = stats.covariance()
    arrays = stats._to_arrays()
    arrays.update(cov=cov, mean=mean, n_images=np.array(0 if info is None else info.n_images, np.int64))
    eps = None
    if want_d:
        eps = DEFAULT_EPS if args.eps is None else args.eps
        D = inv_sqrtm(cov, method=args.method, eps=eps)
        arrays.update(deconv=np.asarray(D), eps=np.array(eps))
    try:
        write_npz_atomic(args.out, arrays)
    except OSError as exc:
        _fail(f"cannot write the statistics to {args.out!r}: {exc.strerror or exc}")
    if args.deconv_kernels is not None:
        kh, kw = stats.kernel_size
        K = deconvolution_kernel(D, (kh, kw), stats.channels,
                                 grouping=stats.grouping if stats.block_size else "contiguous")
        fig = kernel_figure(K, f"{kh}x{kw} deconvolution kernels (centre rows of (Cov+{eps:g}I)^-1/2), "
                               f"{stats.count} patches" + ("" if info is None else f" from {info.n_images} images"))
        try:
            _save_figure_atomic(fig, args.deconv_kernels)
        except (OSError, ValueError) as exc:
            _fail(f"cannot write the kernel picture to {args.deconv_kernels!r}: {_one_line(exc)}")
    seconds = time.perf_counter() - t0
    summary = {"out": os.path.abspath(args.out), "count": stats.count, "channels": stats.channels,
               "kernel_size": list(stats.kernel_size), "cov_shape": list(cov.shape), "dtype": str(cov.dtype),
               "n_images": 0 if info is None else info.n_images, "n_partitions": 0 if info is None else info.n_partitions,
               "tree_depth": 0 if info is None else info.tree_depth, "scheduler": None if info is None else info.scheduler,
               "merged": [os.path.abspath(p) for p, _ in shards], "eps": eps, "method": args.method if want_d else None,
               "deconv_kernels": None if args.deconv_kernels is None else os.path.abspath(args.deconv_kernels),
               "seconds": seconds}
    if args.json:
        text = json.dumps(summary, indent=2)
    else:
        lines = [f"{_PROG}: {stats.count} patch rows of {stats.channels} channel(s), kernel "
                 f"{stats.kernel_size[0]}x{stats.kernel_size[1]}, in {seconds:.1f} s"]
        if info is not None:
            lines.append(f"  {info.n_images} images in {info.n_partitions} partitions of {info.partition_size}, "
                         f"merge tree depth {info.tree_depth}, scheduler {info.scheduler}")
        if shards:
            lines.append(f"  merged {len(shards)} shard(s): {', '.join(p for p, _ in shards)}")
        keys = "count, mean, cov" + (", deconv" if want_d else "")
        lines.append(f"  wrote {args.out} ({keys}; cov {' x '.join(map(str, cov.shape))} {cov.dtype})")
        if args.deconv_kernels is not None:
            lines.append(f"  wrote {args.deconv_kernels}")
        if cov.ndim == 2:
            lines.append(f"  check it: nsiter verify {args.out} --key cov" + (f" --eps {eps:g}" if eps else ""))
        text = "\n".join(lines)
    return write_stdout(_PROG, text + "\n") or EXIT_OK
