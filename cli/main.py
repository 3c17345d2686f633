"""The ``repfuse`` command: a click group with convert, inspect, verify, bench and quantize.

Exit codes: 0 ok; 1 verification failed (nothing written); 2 bad usage or bad input. Errors
are shown as one line (``Error: ...``); ``--debug`` shows the traceback before it, with the
same exit code.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings

import click

from repfuse.cli.context import (
    STAGE_KEY,
    CheckFailed,
    Failure,
    debug_enabled,
    one_line,
    set_debug,
)
from repfuse.errors import ReparamError, VerificationError


class ReparamGroup(click.Group):
    """Maps repfuse errors to exit codes and one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            if not debug_enabled(ctx):
                return _quietly(super().invoke, ctx)
            logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except Exception as exc:
            debug = debug_enabled(ctx)   # (--debug may come after the subcommand)
            if debug:   # the traceback, then the same one-line error and exit code
                click.echo(traceback.format_exc(), err=True, nl=False)
            raise _failure(exc, ctx.meta.get(STAGE_KEY, "run"), debug) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        """Like click's, but a usage error is one line (with a pointer to ``--help``)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {' '.join(exc.format_message().split())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt, EOFError):
            click.echo("Aborted.", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def _failure(exc: Exception, stage: str, debug: bool) -> Failure:
    """The one-line error (and its exit code) for an exception a command raised."""
    if isinstance(exc, VerificationError):
        return CheckFailed(f"verification failed: {one_line(exc)}; nothing written")
    if isinstance(exc, ReparamError):
        return Failure(one_line(exc))
    if isinstance(exc, MemoryError):
        return Failure("out of memory; use a smaller --input-shape or a smaller model")
    kind = Failure if stage == "load" else CheckFailed
    hint = "" if debug else " (rerun with --debug for the traceback)"
    return kind(f"{type(exc).__name__} while {stage_text(stage)}: {one_line(exc)}{hint}")


def stage_text(stage: str) -> str:
    return {"load": "loading the model", "fuse": "fusing", "verify": "verifying",
            "write": "writing the output", "bench": "benchmarking",
            "quantize": "quantizing"}.get(stage, "running")


def _quietly(fn, *args):
    """Run ``fn`` with library warnings and chatty loggers silenced (``--debug`` shows them)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript",
                                              "onnx_ir", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _version() -> str:
    from repfuse import __version__

    return __version__


@click.group(cls=ReparamGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.version_option(_version(), "--version", "-V", prog_name="repfuse")
@click.option("--debug", is_flag=True, expose_value=False, callback=set_debug, is_eager=True,
              help="Show full tracebacks and library logs (also REPFUSE_DEBUG=1).")
def cli() -> None:
    """repfuse: turn multi-branch training-form conv nets (RepVGG, MobileOne, DBB, ACNet, ...)
    into their single-branch inference form, prove that both agree, and export the result.

    \b
    Typical use:
      repfuse convert --arch repvgg_a0 --weights train.pth -o deploy.onnx
      repfuse inspect --timm mobileone_s0 --input-shape 1,3,224,224
      repfuse verify train.onnx deploy.onnx
      repfuse bench --arch repvgg_a0 --plot bench.png
      repfuse quantize --arch repvgg_a0 --weights train.pth --calib batch.npy -o int8.onnx

    Exit codes: 0 ok, 1 verification failed (nothing written), 2 bad usage or bad input.
    """


def _register() -> None:
    from repfuse.cli.commands.bench import bench
    from repfuse.cli.commands.convert import convert
    from repfuse.cli.commands.inspect import inspect
    from repfuse.cli.commands.quantize import quantize
    from repfuse.cli.commands.verify import verify

    for command in (convert, inspect, verify, bench, quantize):
        cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from repfuse.cli.allocator import keep_freed_memory

    keep_freed_memory()
    cli.main(args=argv, prog_name="repfuse")


if __name__ == "__main__":
    main()
