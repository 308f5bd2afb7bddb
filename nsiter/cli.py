"""Command-line interface: ``nsiter info``, ``nsiter verify``, ``nsiter stats`` and ``nsiter --version`` (exit codes:
``_cli_common``)."""
from __future__ import annotations

import argparse
import json
import platform
import sys

from ._cli_common import EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT, EXIT_USAGE, _Parser, _UsageError, write_stdout
from ._stats_cli import add_stats_parser
from ._verify_cli import add_verify_parser

__all__ = ["main"]


def _cmd_info(args) -> int:
    # on first use: ``nsiter verify`` and ``nsiter --version`` load none of them
    import numba
    import numpy
    import scipy

    from . import __version__
    from ._config import THREADING  # noqa: F401  (nsiter's threading-layer choice, made as its kernels load)

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


class _VersionAction(argparse.Action):
    """``--version``: argparse's version action, with the version read (:mod:`importlib.metadata`)
    only when it is asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show program's version number and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        try:  # as argparse prints it; main() flushes and reports a failed write
            sys.stdout.write(f"nsiter {__version__}\n")
        except (AttributeError, OSError):
            pass
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nsiter", description="Network-deconvolution numerics: whitening checks and tools.")
    parser.add_argument("--version", action=_VersionAction)
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
