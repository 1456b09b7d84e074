"""The `urbanseg` command line: one subcommand -> one function in one stage module.

Flags come from the stage's config dataclass in `urbanseg.config`; the stage module is
imported only when its command runs, so `urbanseg --help` is instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from urbanseg import __version__
from urbanseg.config import (
    TYPED_FLAGS,
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    ImportConfig,
    ModelsConfig,
    PackConfig,
    PredictConfig,
    PrepareConfig,
    ServeConfig,
    SynthConfig,
    TrainConfig,
    add_arguments,
    from_namespace,
    typed_flags,
)
from urbanseg.errors import UserError, user_message

# command -> (config class, "module:function"). The only list of commands.
COMMANDS: dict[str, tuple[type, str]] = {
    "synth": (SynthConfig, "urbanseg.synth.writer:synthesize"),
    "prepare": (PrepareConfig, "urbanseg.data.prepare:prepare"),
    "pack": (PackConfig, "urbanseg.data.pack:pack"),
    "models": (ModelsConfig, "urbanseg.models.listing:list_models"),
    "import": (ImportConfig, "urbanseg.models.convert:import_model"),
    "train": (TrainConfig, "urbanseg.training.train:train"),
    "evaluate": (EvaluateConfig, "urbanseg.evaluation.evaluate:evaluate"),
    "predict": (PredictConfig, "urbanseg.inference.predict:predict"),
    "export": (ExportConfig, "urbanseg.inference.export:export"),
    "serve": (ServeConfig, "urbanseg.inference.serve:serve"),
    "demo": (DemoConfig, "urbanseg.demo:demo"),
}


# OS errors that are the user's to fix (a full disk, a read-only folder, missing rights):
# exit 2 with the path and the reason in words, never a traceback. What was already on
# disk is intact: every file is written to a temporary name and renamed.
_WRITE_ERRORS = {
    errno.ENOSPC: "free some space on that disk or write to another one",
    errno.EDQUOT: "free some space within your disk quota or write to another disk",
    errno.EFBIG: "the file is larger than that file system allows; write to another one",
    errno.EROFS: "that file system is mounted read-only; choose a folder on a writable one",
    errno.EACCES: "you lack the permission; fix the permissions or use another path",
    errno.EPERM: "you lack the permission; fix the permissions or use another path",
}


def describe_os_error(e: OSError) -> str | None:
    """The message for an OSError a user can fix ("PATH: No space left on device (ENOSPC);
    free some space ..."), or None for any other (a bug: shown with its traceback)."""
    code = e.errno
    if code is None or code not in _WRITE_ERRORS:
        return None
    where = e.filename if e.filename is not None else "a write"
    return (
        f"{where}: {os.strerror(code)} ({errno.errorcode[code]}); {_WRITE_ERRORS[code]} "
        "(what was already on disk is intact)"
    )


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="urbanseg",
        description="Street-scene semantic segmentation: Cityscapes-layout data -> trained model -> report.",
        epilog="Run `urbanseg COMMAND --help` for the flags of a command.",
    )
    parser.add_argument("--version", action="version", version=f"urbanseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, _) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip()
        summary = doc.split(":", 1)[-1].strip() if doc.startswith("`") else doc
        p = sub.add_parser(name, help=summary, description=summary)
        add_arguments(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    cls, target = COMMANDS[args.command]
    module_name, func_name = target.split(":")
    command_parser = argparse.ArgumentParser(add_help=False)
    add_arguments(command_parser, cls)
    typed = TYPED_FLAGS.set(typed_flags(command_parser, argv))
    try:
        config = from_namespace(cls, args)
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(config)
    except UserError as e:
        print(f"urbanseg {args.command}: error: {user_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        message = describe_os_error(e)
        if message is None:
            raise
        print(f"urbanseg {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"urbanseg {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        TYPED_FLAGS.reset(typed)
    return int(result)
