"""Command-line interface: ``nsiter info``, ``nsiter verify`` and ``nsiter --version``.

Exit codes: 0 success, 1 a requested tolerance was missed, 2 bad input or usage
(one line on stderr, never a traceback).
"""
from __future__ import annotations

import argparse
import platform
import sys

__all__ = ["main"]


class _UsageError(Exception):
    """Bad input or usage: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + exits 2; keep it to one line
        raise _UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _info() -> dict:
    import numba
    import numpy
    import scipy

    import nsiter

    info = {
        "nsiter": nsiter.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "numba_threading_layer": numba.config.THREADING_LAYER,
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import torch
    except ImportError:
        info["torch"] = "not installed"
    else:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _cmd_info(args) -> int:
    import json

    info = _info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nsiter import __version__

    parser = _Parser(prog="nsiter", description="Network-deconvolution numerics: whitening checks and tools.")
    parser.add_argument("--version", action="version", version=f"nsiter {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p_info = sub.add_parser("info", help="versions, Numba threads, torch/CUDA availability")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    try:
        from ._verify_cli import add_verify_parser
    except ImportError:
        pass
    else:
        add_verify_parser(sub)
    return parser


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args))
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nsiter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # run the package's module, not this __main__ copy, so that sub-commands raising
    # nsiter.cli._UsageError (nsiter/_verify_cli.py) are caught by the same class
    from nsiter.cli import main as _main

    sys.exit(_main())
