r"""Dataset-scale patch statistics on Dask: a :class:`~nsiter.PatchStatistics` per partition, merged by a tree.

The statistics of Ye et al. 2020 are dataset statistics (Fig. 2: the deconvolution kernel of 1024
ImageNet images, §4.3.2).  :func:`dataset_statistics` reads a folder, glob or list of image files (or
takes a Dask or numpy array), splits it into partitions, computes the exact moments of each partition
in one Dask task, and merges the partial results pairwise-exactly (Chan, Golub & LeVeque,
:func:`nsiter._moments.merge_moments`) along a tree of ``split_every``-way merges: depth
``ceil(log_split_every(P))`` for ``P`` partitions, never a chain.  Each task holds one batch of at
most :data:`BATCH_BYTES` of pixels plus the ``(G, Fb, Fb)`` moments, whatever the dataset's size.

Dask is an optional dependency (``pip install 'nsiter[dask]'``); this module imports it only when
:func:`dataset_statistics` runs, so ``import nsiter`` stays free of it.
"""
from __future__ import annotations

import contextlib
import glob
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._validation import as_float_array, as_pair, check_option, check_positive_int, is_tensor, result_float_dtype
from .covariance import GROUPINGS, PatchStatistics
from .data import _to_float, load_image

__all__ = ["dataset_statistics", "image_files", "default_partition_size", "DatasetInfo", "IMAGE_EXTENSIONS",
           "LOCAL_SCHEDULERS", "BATCH_BYTES", "DASK_INSTALL_HINT"]

#: File name endings (case-insensitive) that a folder is searched for; a glob or an explicit path takes any file.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
#: Dask's local schedulers, by the names ``dask.compute(scheduler=...)`` takes.
LOCAL_SCHEDULERS = ("threads", "processes", "synchronous")
_SCHEDULER_ALIASES = {"threading": "threads", "multiprocessing": "processes", "sync": "synchronous",
                      "single-threaded": "synchronous"}
#: Pixel bytes per ``PatchStatistics.update`` inside a task: with the ``(G, Fb, Fb)`` moments and the
#: kernels' pieces (8-32 MB) this bounds a task's memory, independent of partition and dataset size.
#: An update costs one merge (1.6 ms at F = 675) on top of >= 50 ms of moments at this size.
BATCH_BYTES = 8 * 2 ** 20
#: Default partitioning: about this many partitions per Dask thread (load balance) of at most
#: :data:`MAX_PARTITION` images (tasks of minutes, not hours, at ImageNet sizes).  The number of partial
#: results then does not grow with the dataset below ``PARTITIONS_PER_THREAD * MAX_PARTITION`` images per
#: thread, nor does the memory of a worker, which holds a batch and up to ``split_every`` results per tree level.
PARTITIONS_PER_THREAD = 4
MAX_PARTITION = 4096
DASK_INSTALL_HINT = "pip install 'nsiter[dask]'"
# PIL modes that matplotlib passes through as raw bands (CMYK would read as RGBA): converted to RGB first
_CONVERT_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")


class DatasetInfo(NamedTuple):
    """What :func:`dataset_statistics` ran (``return_info=True``)."""

    n_images: int  #: images (or array rows along axis 0) read
    n_partitions: int  #: Dask tasks that computed moments
    partition_size: int  #: images per partition (the last may hold fewer)
    tree_depth: int  #: levels of merges above the partitions, ``ceil(log_split_every(n_partitions))``
    split_every: int  #: partial results merged per merge task
    scheduler: str  #: "threads", "processes", "synchronous" or the distributed scheduler's address
    seconds: float  #: wall time of the Dask computation


@dataclass(frozen=True)
class _Spec:
    """What every partition task needs (small and picklable: it travels with each task)."""

    settings: tuple  # PatchStatistics keyword items
    gray: bool
    dtype: str
    crop: tuple | None  # (h, w) centre crop, or None
    shape: tuple | None  # the (C, H, W) every image must have (image_size=None), or None
    channels: int | None
    numba_threads: int | None  # Numba threads in the task (None: leave Numba's count)
    limit_blas: bool  # hold BLAS to numba_threads in the task (not under the threaded scheduler: see _compute)

    def accumulator(self) -> PatchStatistics:
        return PatchStatistics(**dict(self.settings))


def _require_dask():
    try:
        import dask
        import dask.delayed  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"nsiter.dataset_statistics runs on Dask, which is not installed ({exc}); "
                          f"install it with: {DASK_INSTALL_HINT}") from None
    return dask


def image_files(source) -> list[str]:
    """The image paths of a folder, a glob, a file, or a list of them (expanded in order, repeats dropped).

    A folder is searched recursively (ImageNet keeps one sub-folder per class) for names ending in
    :data:`IMAGE_EXTENSIONS`, hidden names (``.*``) skipped, each folder in sorted order; a glob
    (``*``, ``?``, ``[``; ``**`` recursive) keeps the files it matches, sorted; a path to a file is
    taken as it is.

    Raises
    ------
    FileNotFoundError
        A path that is neither a folder nor a file and no glob pattern (or a pattern matching nothing).
    ValueError
        No image files found.
    TypeError
        ``source`` is not a path, a glob or a list of them.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, (str, os.PathLike)) for s in items):
        raise TypeError(f"expected image paths as a folder, a glob, a file or a list of them, got "
                        f"{type(source).__name__}; pass e.g. 'images/', 'images/*.png' or a list of file paths")
    out, seen = [], set()
    for item in items:
        s = os.fspath(item)
        if os.path.isdir(s):
            found = []
            for root, dirs, files in os.walk(s):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in sorted(files)
                          if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise ValueError(f"no image files in folder {s!r} (searched recursively for "
                                 f"{', '.join(IMAGE_EXTENSIONS)}); pass a glob such as '{s}/*.xyz' for other names")
        elif os.path.isfile(s):
            found = [s]
        elif glob.has_magic(s):
            found = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"the glob {s!r} matches no files; check the pattern (quote it in a shell)")
        else:
            raise FileNotFoundError(f"{s!r} is neither a folder, a file nor a glob pattern; check the path")
        for p in found:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.append(p)
    if not out:
        raise ValueError("no image files given; pass a folder, a glob or a non-empty list of paths")
    return out


def _read_image(path: str, gray: bool, dtype) -> np.ndarray:
    """``(C, H, W)`` floats in [0, 1] (:func:`nsiter.data.load_image`) with the channel rules of
    :func:`dataset_statistics`: alpha dropped; grey (L, LA, 1, I, I;16, F) -> 1 channel; colour
    (RGB, RGBA, P, and CMYK/YCbCr/LAB/HSV converted to RGB by Pillow) -> 3; ``gray``: BT.601 luma."""
    from PIL import Image

    with Image.open(path) as im:
        bands = [b for b in im.getbands() if b != "A"]
        grey = len(bands) == 1 and im.mode != "P"
        rgb = np.asarray(im.convert("RGB")) if im.mode in _CONVERT_TO_RGB else None
    if rgb is not None:
        img = _to_float(rgb, True, gray, dtype)
    else:
        img = load_image(path, channels_first=True, gray=gray, dtype=dtype)
    if img.ndim == 2:
        return img[None]
    # matplotlib reads LA as RGBA with R = G = B: keep one copy
    return np.ascontiguousarray(img[:1]) if grey and img.shape[0] > 1 else img


def _describe(shape) -> str:
    c, h, w = shape
    return f"{h}x{w} {'grey' if c == 1 else 'RGB' if c == 3 else f'{c}-channel'}"


def _fit(img, path: str, spec: _Spec):
    """``(image, None)`` cropped per ``spec``, or ``(None, (kind, reason))``: a one-line reason naming ``path``."""
    c, h, w = img.shape
    if spec.channels is not None and c != spec.channels:
        kind = "grey (1 channel)" if c == 1 else f"{c} channels"
        return None, ("channels", f"{path!r} is {kind}, the first image has {spec.channels}")
    if spec.crop is not None:
        ch, cw = spec.crop
        if h < ch or w < cw:
            return None, ("size", f"{path!r} is {h}x{w}, smaller than image_size {ch}x{cw}")
        top, left = (h - ch) // 2, (w - cw) // 2
        return img[:, top:top + ch, left:left + cw], None
    if spec.shape is not None and img.shape != spec.shape:
        return None, ("size", f"{path!r} is {_describe(img.shape)}, the first image {_describe(spec.shape)}")
    return img, None


#: The fix named for each kind of unusable image.
_FIXES = {"read": "remove or re-save the unreadable files",
          "channels": "pass gray=True (--gray) to convert every image to grey, or keep grey and colour images apart",
          "size": "pass image_size=(h, w) (--image-size H,W) to centre-crop every image to one size no larger than "
                  "the smallest, or image_size='any' (--any-size) to use each image whole"}


@contextlib.contextmanager
def _task_threads(n, blas: bool):
    """Numba (and, with ``blas``, BLAS) held to ``n`` threads: Dask runs one task per core, and a BLAS pool
    of its own per task (OpenBLAS spins while it waits) made the moments 5-50x slower on a loaded machine."""
    if n is None:
        yield
        return
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        with _blas_limit(n) if blas else contextlib.nullcontext():
            yield
    finally:
        numba.set_num_threads(before)


def _blas_limit(n):
    from ._numba.linalg import _blas_controller

    return _blas_controller().limit(limits=int(n), user_api="blas")


def _update(stats: PatchStatistics, imgs: np.ndarray, names) -> None:
    """``stats.update`` in batches of at most :data:`BATCH_BYTES`; a refusal names the images."""
    step = max(1, BATCH_BYTES // max(1, imgs[0].nbytes))
    for i in range(0, len(imgs), step):
        try:
            stats.update(imgs[i:i + step])
        except (ValueError, TypeError) as exc:
            which = names(i, min(len(imgs), i + step))
            raise type(exc)(f"{which}: {exc}") from None


def _files_statistics(paths: list, spec: _Spec) -> PatchStatistics:
    """One partition task: the statistics of the image files ``paths``.

    Images of one shape are stacked up to :data:`BATCH_BYTES` per update.  Every unusable file of the
    partition is listed in one ``ValueError`` (reading goes on, computing stops, after the first)."""
    stats, batch, names, problems = spec.accumulator(), [], [], []

    def flush():
        if batch:
            imgs = np.stack(batch)
            _update(stats, imgs, lambda i, j: f"images {', '.join(map(repr, names[i:j][:3]))}"
                                              f"{' ...' if j - i > 3 else ''} ({_describe(imgs.shape[1:])})")
            batch.clear()
            names.clear()

    with _task_threads(spec.numba_threads, spec.limit_blas):
        for path in paths:
            try:
                img = _read_image(path, spec.gray, spec.dtype)
            except Exception as exc:  # Pillow / matplotlib raise many kinds for corrupt files
                problems.append(("read", f"cannot read {path!r} ({type(exc).__name__}: {' '.join(str(exc).split())})"))
                continue
            img, problem = _fit(img, path, spec)
            if problem:
                problems.append(problem)
            if problems:
                continue
            if batch and (img.shape != batch[0].shape or (len(batch) + 1) * img.nbytes > BATCH_BYTES):
                flush()
            batch.append(img)
            names.append(path)
        if not problems:
            flush()
    if problems:
        more = f" ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        fixes = "; ".join(_FIXES[k] for k in dict.fromkeys(k for k, _ in problems))
        raise ValueError(f"{len(problems)} of the {len(paths)} images of a partition cannot be used: "
                         f"{'; '.join(t for _, t in problems[:5])}{more}; {fixes}")
    return stats


def _array_statistics(block, spec: _Spec) -> PatchStatistics:
    """One partition task: the statistics of an ``(n, C, H, W)`` block."""
    stats = spec.accumulator()
    with _task_threads(spec.numba_threads, spec.limit_blas):
        _update(stats, np.asarray(block), lambda i, j: f"array images {i}..{j - 1} of a partition")
    return stats


def _merge(settings: tuple, *parts: PatchStatistics) -> PatchStatistics:
    """One merge task: a fresh accumulator holding ``parts`` merged in order (inputs untouched)."""
    out = PatchStatistics(**dict(settings))
    for p in parts:
        out.merge(p)
    return out


def _tree(dask, leaves: list, settings: tuple, split_every: int, token: str):
    """The root of a ``split_every``-way tree of merges over ``leaves`` and its depth."""
    level, depth = list(leaves), 0
    while len(level) > 1:
        depth += 1
        level = [dask.delayed(_merge, pure=True)(settings, *level[i:i + split_every],
                                                 dask_key_name=f"nsiter-merge-{depth}-{i // split_every}-{token}")
                 for i in range(0, len(level), split_every)]
    return level[0], depth


def _scheduler(scheduler):
    """``(kind, client_or_name, close)``: kind "local" (a scheduler name) or "distributed" (a Client)."""
    if scheduler is None:
        distributed = sys.modules.get("distributed")
        if distributed is not None:
            try:
                return "distributed", distributed.default_client(), False
            except ValueError:  # no client running
                pass
        # the threaded scheduler, unless Numba's parallel kernels are serialised process-wide (workqueue layer)
        from ._config import THREADING  # (Numba's configuration: imported when a scheduler is chosen)

        return "local", "processes" if THREADING.serialised else "threads", False
    if isinstance(scheduler, str):
        name = _SCHEDULER_ALIASES.get(scheduler, scheduler)
        if name in LOCAL_SCHEDULERS:
            return "local", name, False
        try:
            import distributed
        except ImportError as exc:
            raise ImportError(f"a scheduler address ({scheduler!r}) needs dask.distributed, which is not installed "
                              f"({exc}); install it with: {DASK_INSTALL_HINT}") from None
        try:
            return "distributed", distributed.Client(scheduler), True
        except (OSError, TimeoutError, ValueError) as exc:
            raise OSError(f"cannot connect to the Dask scheduler at {scheduler!r} ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())}); start one (dask scheduler / dask worker) or pass "
                          f"one of {', '.join(LOCAL_SCHEDULERS)}") from None
    distributed = sys.modules.get("distributed")
    if distributed is not None and isinstance(scheduler, distributed.Client):
        return "distributed", scheduler, False
    raise TypeError(f"expected scheduler as None, one of {', '.join(map(repr, LOCAL_SCHEDULERS))}, a scheduler "
                    f"address ('tcp://host:8786') or a distributed.Client, got {type(scheduler).__name__}")


def default_partition_size(n_images: int, n_threads: int) -> int:
    """Images per partition when ``partition_size`` is not given (:data:`PARTITIONS_PER_THREAD`, :data:`MAX_PARTITION`)."""
    return max(1, min(MAX_PARTITION, math.ceil(n_images / (PARTITIONS_PER_THREAD * max(1, n_threads)))))


def _threads(kind: str, target) -> int:
    if kind == "distributed":
        return max(1, sum(target.nthreads().values()))
    return 1 if target == "synchronous" else os.cpu_count() or 1


def _compute(dask, root, kind: str, target, progress: bool, minimum: float, blas_threads):
    if kind == "distributed":
        future = target.compute(root)
        if progress:
            from distributed import progress as bar

            with contextlib.redirect_stdout(sys.stderr):  # TextProgressBar writes to sys.stdout
                bar(future, notebook=False, multi=False)
        return future.result()
    from dask.diagnostics import ProgressBar

    # the threaded scheduler shares one BLAS pool: limit it here, once, not per task (the limit is process-wide)
    with (_blas_limit(blas_threads) if target == "threads" and blas_threads else contextlib.nullcontext()), \
            (ProgressBar(minimum=minimum, out=sys.stderr) if progress else contextlib.nullcontext()):
        return dask.compute(root, scheduler=target)[0]


def _check_images(arr) -> None:
    if 0 in arr.shape:
        raise ValueError(f"expected a non-empty image array (N, C, H, W), got shape {tuple(arr.shape)}")


def _crop(image_size):
    if image_size is None or (isinstance(image_size, str) and image_size == "any"):
        return None
    if isinstance(image_size, str):
        raise ValueError(f"expected image_size as None, 'any', an int or an (h, w) pair, got {image_size!r}")
    return as_pair(image_size, "image_size", minimum=1)


def dataset_statistics(source, kernel_size, *, stride=1, padding=0, dilation=1, sampling_stride=1,
                       block_size=None, grouping="contiguous", image_size=None, gray=False, dtype=np.float64,
                       scheduler=None, partition_size=None, split_every=8, numba_threads=None, progress=None,
                       return_info=False):
    r"""The patch statistics of a whole image dataset, computed on Dask and merged exactly.

    The result equals one :class:`~nsiter.PatchStatistics` fed every image in turn (up to rounding,
    about 1e-15 relative): the Chan–Golub–LeVeque merge of the partitions' centred moments is exact
    in exact arithmetic, so the partitioning and the scheduler do not change the statistics.  This is
    the dataset covariance behind Fig. 2 of Ye et al. 2020 (§4.3.2: 1024 ImageNet images).

    Parameters
    ----------
    source : folder, glob, path, list of paths, dask.array.Array or array_like
        Image files (see :func:`image_files`: folders are searched recursively), or images
        ``(N, C, H, W)`` (also ``(C, H, W)`` / ``(H, W)``) as a Dask array or in memory.
    kernel_size, stride, padding, dilation, sampling_stride, block_size, grouping
        As in :func:`nsiter.patch_covariance`.
    image_size : None, "any", int or (h, w), optional
        ``None``: every image must have the size of the first (else a ``ValueError`` lists the
        files and sizes that differ); ``"any"``: each image used whole at its own size (patches of
        larger images weigh more); ``(h, w)``: each image centre-cropped to ``h x w`` (rows from
        ``(H - h) // 2``, columns from ``(W - w) // 2``), smaller images refused by name.  Files only.
    gray : bool, optional
        Channel rules for files: alpha is dropped (RGBA -> RGB, LA -> L); grey files (L, 1, I;16, F)
        give 1 channel, colour files (RGB, palette, CMYK via Pillow) 3.  ``False``: all images must
        have the channel count of the first (a mix of grey and colour is refused, naming the files);
        ``True``: every image becomes one BT.601 luma channel, as ``nsiter.data.load_image(gray=True)``.
    dtype : float64 or float32, optional
        Pixel dtype of the images read (values in [0, 1]).  The moments are float64 either way;
        float32 halves the batches' memory and gives a float32 ``covariance()``.
    scheduler : None, str or distributed.Client, optional
        ``None``: the running ``distributed`` default client if there is one, else Dask's threaded
        local scheduler (``"processes"`` when Numba's threading layer is not thread-safe);
        ``"threads"``, ``"processes"``, ``"synchronous"``; a scheduler address
        (``"tcp://host:8786"``, connected to and closed again); or a ``distributed.Client``.
    partition_size : int, optional
        Images (array rows) per partition task.  Default: about :data:`PARTITIONS_PER_THREAD`
        partitions per Dask thread, at most :data:`MAX_PARTITION` images; a Dask array keeps its
        chunks along axis 0.  It changes the work's granularity, not the result.
    split_every : int, optional
        Partial results per merge task (>= 2): the tree has depth ``ceil(log_split_every(P))``.
    numba_threads : int, optional
        Numba and BLAS threads in each task.  Default 1 when tasks run in parallel (Dask supplies
        the parallelism: one task per core); Numba's and BLAS's own counts with ``"synchronous"``.
    progress : bool, optional
        A progress bar on stderr (``dask.diagnostics.ProgressBar``, or ``distributed.progress``).
        Default: when stderr is a terminal (local schedulers: for runs longer than 0.5 s).
    return_info : bool, optional
        Also return a :class:`DatasetInfo`.

    Returns
    -------
    stats : PatchStatistics
        ``stats.covariance(eps)`` gives ``(cov, mean)``; ``stats.save(path)`` a shard that merges with others.
    info : DatasetInfo
        Only with ``return_info=True``.

    Raises
    ------
    ImportError
        Dask is not installed (the message gives ``pip install 'nsiter[dask]'``).
    ValueError
        Images that cannot be read or do not fit the size and channel rules (named, with the fix);
        invalid settings as :class:`~nsiter.PatchStatistics`; an empty source.
    FileNotFoundError, TypeError, OSError
        A missing path; a source or scheduler of the wrong type; an unreachable scheduler address.

    Notes
    -----
    Memory: a task holds one batch of at most :data:`BATCH_BYTES` of pixels (images of one size
    stacked) and the ``G Fb^2`` float64 moments, whatever the partition and the dataset size; a
    merge task holds ``split_every + 1`` such moments.  The client holds the list of paths.

    Examples
    --------
    >>> import numpy as np, nsiter
    >>> x = np.random.default_rng(0).random((12, 3, 16, 16))
    >>> stats = nsiter.dataset_statistics(x, 3, partition_size=4, progress=False)
    >>> ref, _ = nsiter.PatchStatistics(3).update(x).covariance()
    >>> bool(np.linalg.norm(stats.covariance()[0] - ref) <= 1e-13 * np.linalg.norm(ref))
    True
    """
    dask = _require_dask()
    settings = PatchStatistics(kernel_size, stride=stride, padding=padding, dilation=dilation,
                               sampling_stride=sampling_stride, block_size=block_size,
                               grouping=check_option(grouping, "grouping", GROUPINGS))._settings()
    settings = tuple(settings.items())
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"expected dtype float32 or float64 for the pixels, got {dtype}")
    split_every = check_positive_int(split_every, "split_every", minimum=2)
    if partition_size is not None:
        partition_size = check_positive_int(partition_size, "partition_size")
    if numba_threads is not None:
        numba_threads = check_positive_int(numba_threads, "numba_threads")
    crop = _crop(image_size)
    da = sys.modules.get("dask.array")
    is_dask_array = da is not None and isinstance(source, da.Array)
    is_files = isinstance(source, (str, os.PathLike)) or (
        isinstance(source, (list, tuple)) and len(source) > 0 and all(isinstance(s, (str, os.PathLike)) for s in source))
    if not is_files and (image_size is not None or gray):
        raise ValueError("image_size and gray apply to image files; crop or convert an array before passing it")

    kind, target, close = _scheduler(scheduler)
    try:
        name = target if kind == "local" else target.scheduler.address
        parallel = kind == "distributed" or target != "synchronous"
        threads = numba_threads if numba_threads is not None else (1 if parallel else None)
        blas = threads is not None and target != "threads"
        token = uuid.uuid4().hex[:12]
        if is_files:
            paths = image_files(source)
            first = paths[0]
            try:
                img0 = _read_image(first, gray, dtype)
            except Exception as exc:
                raise ValueError(f"cannot read {first!r} ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                                 "remove or re-save it") from None
            spec = _Spec(settings, bool(gray), dtype.name, crop,
                         img0.shape if crop is None and image_size is None else None, img0.shape[0], threads, blas)
            n = len(paths)
            size = partition_size or default_partition_size(n, _threads(kind, target))
            leaves = [dask.delayed(_files_statistics, pure=True)(paths[i:i + size], spec,
                                                                  dask_key_name=f"nsiter-images-{i // size}-{token}")
                      for i in range(0, n, size)]
        else:
            spec = _Spec(settings, False, dtype.name, None, None, None, threads, blas)
            if is_dask_array:
                arr = source
                result_float_dtype(arr.dtype)  # complex / non-numeric: the package's TypeError
                if arr.ndim not in (2, 3, 4):
                    raise ValueError(f"expected a dask array of images (N, C, H, W), (C, H, W) or (H, W), "
                                     f"got shape {arr.shape}")
                arr = arr[(None,) * (4 - arr.ndim)]
                if any(math.isnan(s) for s in arr.shape):
                    raise ValueError("the dask array has unknown chunk sizes; call source.compute_chunk_sizes() first")
                n = int(arr.shape[0])
                _check_images(arr)
                arr = arr.rechunk({0: partition_size or arr.chunks[0], 1: -1, 2: -1, 3: -1})
                size = max(arr.chunks[0]) if n else 0
                blocks = list(arr.to_delayed().ravel())
            else:
                if is_tensor(source):
                    source = source.detach().cpu().numpy()
                if isinstance(source, (list, tuple)) and not source:
                    raise ValueError("no image files given; pass a folder, a glob or a non-empty list of paths")
                arr = as_float_array(source, "source")
                if arr.ndim not in (2, 3, 4):
                    raise ValueError(f"expected images (N, C, H, W), (C, H, W) or (H, W) as source, got shape "
                                     f"{arr.shape} (or image paths: a folder, a glob, a list of files)")
                arr = arr[(None,) * (4 - arr.ndim)]
                n = arr.shape[0]
                _check_images(arr)
                size = partition_size or default_partition_size(n, _threads(kind, target))
                blocks = [arr[i:i + size] for i in range(0, n, size)]
                if kind == "distributed":  # ship each block once, not inside the graph
                    blocks = target.scatter(blocks)
            leaves = [dask.delayed(_array_statistics, pure=True)(b, spec, dask_key_name=f"nsiter-array-{i}-{token}")
                      for i, b in enumerate(blocks)]
        root, depth = _tree(dask, leaves, settings, split_every, token)
        show = progress if progress is not None else bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())
        t0 = time.perf_counter()
        # asked for: always; on a terminal by default: not for sub-second runs
        stats = _compute(dask, root, kind, target, bool(show), 0.0 if progress else 0.5, threads)
        seconds = time.perf_counter() - t0
    finally:
        if close:
            target.close()
    if not return_info:
        return stats
    return stats, DatasetInfo(n, len(leaves), size, depth, split_every, str(name), seconds)
