"""``nsiter verify FILE``: the command-line face of :func:`nsiter.verify_whitening`.

What it reads, reports and exits with: ``_DESCRIPTION`` and ``_EPILOG`` (its ``--help``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import stat
import sys
import time
import warnings

import numpy as np

from ._cli_common import EXIT_FAILED, EXIT_OK, _UsageError, internal_error, one_line as _one_line, write_stdout
from .covariance import covariance
from .newton_schulz import METHODS
from .verification import DEFAULT_METHODS, verify_whitening

__all__ = ["add_verify_parser", "load_matrix", "data_covariance"]

_PROG = "nsiter verify"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"  # local file header PK\x03\x04, or PK\x05\x06 for an empty archive
#: Estimated flops above which a terminal gets progress lines; smaller checks end before
#: progress lines would help (measured times: analysis/results/verify.md).
_PROGRESS_FLOPS = 2e10
_RESAVE_TEXT = "save the matrix with numpy.save (.npy) or numpy.savetxt (text/CSV)"
#: --n-iter above this is refused: the coupled iteration reaches its floor within ~100 iterations for any
#: kappa < 1/u (the smallest scaled eigenvalue grows 9/4-fold per step), so more only costs time.
MAX_N_ITER = 10_000
#: Default --max-bytes: the largest array (declared in a .npy header) or text file read; checking needs a few copies.
MAX_BYTES = 2 ** 30
_NOT_REGULAR = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe), not a regular file",
                stat.S_IFCHR: "a character device, not a regular file", stat.S_IFBLK: "a block device, not a regular file",
                stat.S_IFSOCK: "a socket, not a regular file"}

_DESCRIPTION = """\
Check how accurately each inverse-square-root method whitens a covariance C: for every
method, D ~ (C + eps*I)^(-1/2) is computed with nsiter.inv_sqrtm and measured in float64
against the float64 eigh solution (nsiter.verify_whitening).

Reported per method: the residual ||D_k D_k C - I||_F per iteration (the metric of Ye et al.
2020, Fig. 7), the iterations needed to reach 1e-2 ... 1e-12, divergence, and for the matrix D
returned: ||DDC - I||_F, ||DCD - I||_F/sqrt(n), ||D - D_exact||_F/||D_exact||_F.  For the
matrix: eigenvalue range, condition number kappa, and the accuracy floor kappa*u of the dtype
(u = unit roundoff) below which ||DDC - I||_F and the forward error cannot be expected to go."""

_EPILOG = """\
FILE formats:
  .npy            one array
  .npz            the only array it holds, or the one named by --key
  anything else   text: numbers separated by commas, semicolons, tabs or whitespace
                  (detected from the first lines); '#' starts a comment; one header
                  line of non-numbers is skipped
  The format is recognised from the file's content, not its extension.

--tol T applies to ||D_k D_k C - I||_F (Frobenius, not normalised) of the LAST iterate of
every requested method (so a method that diverged fails even if an earlier iterate was good).

exit status: 0 ran (and every method met --tol), 1 a method missed --tol,
             2 bad input or usage (one line on stderr), 3 internal error,
             4 stdout closed or not writable (e.g. a full disk)

examples:
  nsiter verify cov.npy
  nsiter verify cov.npy --method coupled --n-iter 15 --tol 1e-6 --plot residuals.png
  nsiter verify patches.csv --from-data --dtype float32 --json"""


def _fail(message: str):
    # the class nsiter.cli.main catches: one line on stderr, exit 2
    raise _UsageError(f"{_PROG}: {message}")


def _number(kind, ok, want: str, example: str = ""):
    """An argparse type: ``kind(text)`` where ``ok`` of it holds, else "expected {want}, got {text!r}{example}"."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}{example}")
        return v

    return parse


_n_iter = _number(int, lambda v: 1 <= v <= MAX_N_ITER, "a positive integer",
                  f" (e.g. --n-iter 50; at most {MAX_N_ITER}: the iteration reaches its floor within ~100, "
                  "more only costs time)")
_max_bytes = _number(int, lambda v: v >= 1, "a positive number of bytes", f" (e.g. --max-bytes {4 * MAX_BYTES})")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0 (e.g. 1e-6)")
_nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (e.g. 1e-5)")


def add_verify_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``verify`` sub-command to ``nsiter``'s sub-parsers (called by :mod:`nsiter.cli`)."""
    p = subparsers.add_parser(
        "verify", help="check how accurately Newton-Schulz / eigh whiten a covariance from a file",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="covariance (n x n) or, with --from-data, data (samples x features)")
    p.add_argument("--method", "-m", action="append", metavar="M",
                   help="method to run; repeat or comma-separate for several "
                        f"(default: coupled, uncoupled, eigh; choices: {', '.join(METHODS)})")
    p.add_argument("--n-iter", type=_n_iter, default=50, metavar="N",
                   help="iterations per iterative method (default 50: long enough to show the uncoupled blow-up; "
                        f"at most {MAX_N_ITER})")
    p.add_argument("--eps", type=_nonnegative_float, default=0.0, metavar="E",
                   help="ridge: check C + E*I (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="working dtype of the methods (default: the file's; text files are float64)")
    p.add_argument("--tol", type=_positive_float, default=None, metavar="T",
                   help="pass/fail level for ||D_k D_k C - I||_F of each method's last iterate; "
                        "exit 1 if any method misses it")
    p.add_argument("--plot", metavar="OUT.png", help="save the residual-per-iteration plot (png, pdf, svg, ...)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    p.add_argument("--key", metavar="NAME", help="array to use from an .npz holding several")
    p.add_argument("--from-data", action="store_true",
                   help="FILE is a samples x features data matrix: check its covariance (X-mu)^T(X-mu)/N")
    p.add_argument("--max-bytes", type=_max_bytes, default=MAX_BYTES, metavar="B",
                   help="refuse, before loading, an array (as its .npy header declares it) or a text file "
                        f"larger than B bytes (default {MAX_BYTES} = 1 GiB)")
    p.set_defaults(func=_cmd_verify)
    return p


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _load_text(path: str):
    """The numbers of a text file: a UTF-8 BOM is dropped, and comments are cut before decoding ('#' is one
    byte in UTF-8), so they may hold any bytes; a data line must be UTF-8. Lines keep the file's numbering."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw[:65536]:
        _fail(f"cannot read {path!r}: it is a binary file but not .npy/.npz; {_RESAVE_TEXT}")
    lines = []
    for i, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        try:
            lines.append(line.split(b"#", 1)[0].decode("utf-8"))
        except UnicodeDecodeError:
            _fail(f"cannot read {path!r}: line {i} is not UTF-8 text (other bytes may appear only in '#' comments) "
                  f"and the file is not .npy/.npz; {_RESAVE_TEXT}")
    data_lines = [(i, ln) for i, ln in enumerate(ln.strip() for ln in lines) if ln]
    if not data_lines:
        _fail(f"{path!r} holds no numbers (empty text file); write the matrix one row per line")
    # the delimiter every one of the first 50 data lines holds; None: runs of whitespace
    delimiter = next((d for d in (";", "\t", ",") if all(d in ln for _, ln in data_lines[:50])), None)
    header = not any(_is_number(s) for s in data_lines[0][1].split(delimiter))
    skip = data_lines[0][0] + 1 if header else 0  # skip a header line (and what precedes it)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data" -> checked below
            return np.loadtxt(lines, delimiter=delimiter, comments=None, skiprows=skip, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        what = {None: "whitespace", ",": "comma", ";": "semicolon", "\t": "tab"}[delimiter]
        _fail(f"cannot parse {path!r} as {what}-separated numbers: {_one_line(exc)}; "
              "every row needs the same number of numeric fields")


def _read(load, what: str, fix: str, pickled: str | None = None):
    """``load()``, any error reported as "cannot read {what} (...); {fix}".

    ``pickled``: the message for an object array; with it a ``ValueError`` is reported without its type name.
    """
    try:
        return load()
    except Exception as exc:  # truncated / corrupt files raise various errors
        if pickled is not None and isinstance(exc, ValueError):
            if "pickle" in str(exc):
                _fail(pickled)
            _fail(f"cannot read {what} ({_one_line(exc)}); {fix}")
        _fail(f"cannot read {what} ({type(exc).__name__}: {_one_line(exc)}); {fix}")


def _check_size(what: str, nbytes: int, max_bytes: int):
    if nbytes > max_bytes:
        _fail(f"cannot load {what} {nbytes} bytes ({nbytes / 2 ** 30:.2f} GiB), more than --max-bytes {max_bytes}; "
              "pass a larger --max-bytes if the machine has the memory for it")


def _check_declared_size(open_npy, what: str, fix: str, max_bytes: int):
    """Refuse the ``.npy`` stream ``open_npy()`` if its header declares more than ``max_bytes``, before loading it."""
    def header():
        with open_npy() as f:
            fmt = np.lib.format  # format 3.0 differs from 2.0 only in the header's text encoding
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            return read(f)

    shape, _, dtype = _read(header, what, fix)
    _check_size(f"{what}: its header declares a {' x '.join(map(str, shape)) or 'scalar'} {dtype} array of",
                math.prod(shape) * dtype.itemsize, max_bytes)


def load_matrix(path, key: str | None = None, max_bytes: int = MAX_BYTES):
    """Read the array in ``path`` (``.npy``, ``.npz`` or text/CSV), recognised by content.

    Only a regular file is opened (a FIFO or device could block or never end); an array larger than
    ``max_bytes`` (by its ``.npy`` header) or a larger text file is refused before loading. A missing,
    unreadable, oversized or ambiguous file raises the CLI's usage error (exit 2, one line).
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                magic = f.read(6)
    except (FileNotFoundError, NotADirectoryError):
        _fail(f"file {path!r} does not exist; pass the path of a .npy, .npz or text/CSV file")
    except OSError as exc:
        _fail(f"cannot open {path!r}: {exc.strerror or exc}; check the path and its permissions")
    if not stat.S_ISREG(st.st_mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(st.st_mode), "not a regular file")
        _fail(f"{path!r} is {kind}; pass the path of a .npy, .npz or text/CSV file")
    ext = os.path.splitext(path)[1].lower()
    if magic.startswith(_NPY_MAGIC):
        if key is not None:
            _fail(f"--key {key!r} applies to .npz files, but {path!r} is a .npy file holding one array; drop --key")
        what, fix = f"{path!r} as a .npy file", "re-save it with numpy.save"
        _check_declared_size(lambda: open(path, "rb"), what, fix, max_bytes)
        return _read(lambda: np.load(path, allow_pickle=False), what, fix, f"{path!r} holds an object (pickled) "
                     "array; save a numeric array, e.g. np.save(path, C.astype(float))")
    if magic.startswith(_ZIP_MAGIC):
        with _read(lambda: np.load(path, allow_pickle=False), f"{path!r} as an .npz file",
                   "re-save it with numpy.savez") as npz:
            names = list(npz.files)
            if not names:
                _fail(f"{path!r} holds no arrays; save the matrix with numpy.savez(path, C=C)")
            if key is None:
                if len(names) > 1:
                    _fail(f"{path!r} holds {len(names)} arrays ({', '.join(names)}); choose one with --key NAME")
                key = names[0]
            elif key not in names:
                _fail(f"{path!r} has no array {key!r}; it holds: {', '.join(names)} (pass one of them to --key)")
            what, fix = f"array {key!r} from {path!r}", "re-save it with numpy.savez"
            member = key if key in npz.zip.namelist() else f"{key}.npy"  # as npz[key] finds it
            _check_declared_size(lambda: npz.zip.open(member), what, fix, max_bytes)
            return _read(lambda: npz[key], what, fix,
                         f"array {key!r} in {path!r} is an object (pickled) array; save a numeric array")
    if ext in (".npy", ".npz"):
        saver = "save" if ext == ".npy" else "savez"
        _fail(f"{path!r} is not a valid {ext} file (wrong header); re-save it with numpy.{saver}")
    if key is not None:
        _fail(f"--key {key!r} applies to .npz files, but {path!r} is a text file; drop --key")
    _check_size(f"{path!r}: a text file of", st.st_size, max_bytes)
    return _load_text(path)


def _check_array(arr, path: str, from_data: bool):
    """Shape / dtype / finiteness checks with CLI-specific fixes; returns a float array."""
    if arr.dtype.kind == "c":
        _fail(f"{path!r} holds complex numbers ({arr.dtype}); a covariance is real: pass its real part")
    if arr.dtype.kind not in "biuf":
        _fail(f"{path!r} holds a non-numeric array (dtype {arr.dtype}); save a float array")
    if arr.size == 0:
        _fail(f"{path!r} holds an empty array of shape {arr.shape}; pass a non-empty matrix")
    what = "data matrix (samples x features)" if from_data else "covariance matrix (n x n)"
    if arr.ndim == 1:
        _fail(f"expected a 2-D {what} in {path!r}, got a 1-D array of {arr.size} values; "
              "save it as a 2-D array (np.save(path, C) with C.shape == (n, n))")
    if arr.ndim != 2:
        _fail(f"expected a 2-D {what} in {path!r}, got shape {arr.shape}; verify checks one matrix: "
              "save one of them (e.g. C[0])")
    if not from_data and arr.shape[0] != arr.shape[1]:
        _fail(f"expected a square covariance in {path!r}, got a {arr.shape[0]} x {arr.shape[1]} matrix; "
              "if rows are samples and columns features add --from-data to form its covariance "
              "(a CSV index column also makes it non-square)")
    if arr.dtype.kind != "f" or arr.dtype.itemsize < 4:
        arr = arr.astype(np.float64 if arr.dtype.kind != "f" else np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        _fail(f"{path!r} holds {int(arr.size - finite.sum())} NaN/inf values (first at row {bad[0]}, "
              f"column {bad[1]}); remove or impute them first")
    if from_data and arr.shape[0] < 2:
        _fail(f"--from-data needs at least 2 samples (rows) in {path!r}, got {arr.shape[0]}; "
              "check that rows are samples (transpose the file otherwise)")
    return arr


def data_covariance(X):
    """``(X - mu)^T (X - mu) / N`` accumulated in float64 (:func:`nsiter.covariance`)."""
    return covariance(np.asarray(X, dtype=np.float64))[0]


def _check_plot_path(path: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        _fail(f"cannot write the plot to {path!r}: directory {parent!r} does not exist; create it or pick another path")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if ext not in formats:
        _fail(f"cannot write the plot to {path!r}: unknown image format {ext!r}; "
              f"use one of the extensions {', '.join('.' + f for f in sorted(formats))}")


def _progress_printer(n: int, n_iter: int, methods):
    """Progress lines on stderr when it is a terminal and the run is long; else ``None``."""
    iterative = sum(1 for m in methods if m != "eigh")
    flops = 10.0 * n ** 3 * (1 + iterative * n_iter) + 10.0 * n ** 3 * len(methods)
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()) or flops < _PROGRESS_FLOPS:
        return None
    t0 = time.perf_counter()

    def progress(step: str, i: int, total: int) -> None:
        print(f"{_PROG}: [{i}/{total}] {step} ... ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

    return progress


def _parse_methods(values) -> tuple:
    if not values:
        return DEFAULT_METHODS
    names = [s.strip() for v in values for s in v.split(",") if s.strip()]
    for m in names:
        if m not in METHODS:
            _fail(f"unknown method {m!r}; choose from: {', '.join(METHODS)} (repeat --method or comma-separate)")
    return tuple(dict.fromkeys(names))  # drop repeats, keep order


def _cmd_verify(args) -> int:
    try:
        return _run_verify(args)
    except _UsageError:
        raise
    except MemoryError:
        _fail(f"not enough memory to check {args.file!r}; try a smaller matrix")
    except Exception as exc:  # an internal error: one line, exit 3 (the traceback on request)
        return internal_error(_PROG, exc)


def _run_verify(args) -> int:
    methods = _parse_methods(args.method)
    if args.plot is not None:
        _check_plot_path(args.plot)
    arr = _check_array(load_matrix(args.file, args.key, args.max_bytes), args.file, args.from_data)
    C = data_covariance(arr) if args.from_data else arr
    if args.from_data and args.dtype is None:
        C = C.astype(arr.dtype if arr.dtype == np.float32 else np.float64)
    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.showwarning = lambda message, *_: print(f"{_PROG}: warning: {_one_line(message)}", file=sys.stderr)
        try:
            report = verify_whitening(C, methods=methods, n_iter=args.n_iter, eps=args.eps, dtype=args.dtype,
                                      tol=args.tol, progress=_progress_printer(C.shape[0], args.n_iter, methods))
        except (ValueError, TypeError) as exc:
            src = f"{args.file} (covariance of the data)" if args.from_data else args.file
            _fail(f"{src}: {_one_line(exc)}")
    source = os.path.basename(args.file) + (" --from-data" if args.from_data else "")
    report = dataclasses.replace(report, source=source)
    if args.plot is not None:
        try:
            report.plot(args.plot)
        except (OSError, ValueError) as exc:
            _fail(f"cannot write the plot to {args.plot!r}: {_one_line(exc)}")
    if args.json:
        d = dict(report.to_dict(), file=os.path.abspath(args.file), from_data=bool(args.from_data),
                 plot=None if args.plot is None else os.path.abspath(args.plot))
        text = json.dumps(d, indent=2, allow_nan=False)
    else:
        text = str(report) + ("" if args.plot is None else f"\n\n  plot: {args.plot}")
    code = write_stdout(_PROG, text + "\n")  # a broken pipe (`| head`) stops quietly
    if code is not None:
        return code
    if args.tol is not None and not report.passed():
        worst = ", ".join(f"{m} ({report[m].final_residual:.2e})" for m in report.failures())
        print(f"{_PROG}: FAIL: ||D_k D_k C - I||_F of the last iterate above --tol {args.tol:g} for {worst}",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
