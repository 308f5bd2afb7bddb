"""Command-line interface: ``nsiter info``, ``nsiter verify``, ``nsiter stats`` and ``nsiter --version`` (exit codes:
``_cli_common``)."""
from __future__ import annotations

import argparse
import json
import platform
import sys

import numba
import numpy

from . import __version__
from ._cli_common import EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT, EXIT_USAGE, _Parser, _UsageError, write_stdout
from ._stats_cli import add_stats_parser
from ._verify_cli import add_verify_parser

__all__ = ["main"]


def _cmd_info(args) -> int:
    import scipy  # on first use, as in nsiter.kernel_estimation

    info = {
        "nsiter": __version__,
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
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), cuda=torch.cuda.is_available())
        if info["cuda"]:
            info["cuda_device"] = torch.cuda.get_device_name(0)
    width = max(len(k) for k in info)
    text = json.dumps(info, indent=2) if args.json else "\n".join(f"{k:<{width}}  {v}" for k, v in info.items())
    return write_stdout("nsiter info", text + "\n") or EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nsiter", description="Network-deconvolution numerics: whitening checks and tools.")
    parser.add_argument("--version", action="version", version=f"nsiter {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p_info = sub.add_parser("info", help="versions, Numba threads, torch/CUDA availability")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    add_verify_parser(sub)
    add_stats_parser(sub)
    return parser


def main(argv=None) -> int:
    """Run ``nsiter`` with ``argv``; the exit status (``_cli_common.EXIT_*``). ``--help``/``--version`` raise SystemExit."""
    if sys.stdout is None:  # fd 1 closed at start-up (`>&-`): print() would drop every report silently
        print("nsiter: stdout is closed; redirect it to a file or to /dev/null instead", file=sys.stderr)
        return EXIT_OUTPUT
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version printed to stdout: make sure it got there
            raise SystemExit(write_stdout("nsiter") or exc.code) from None
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args))
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nsiter: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    # _UsageError lives in nsiter._cli_common, so this __main__ copy of the module catches the sub-commands' one
    sys.exit(main())
