"""Shared state of a command run: debug flag, current stage, and the one-line failure."""

from __future__ import annotations

import os

import click

DEBUG_KEY = "repfuse.debug"
STAGE_KEY = "repfuse.stage"


class Failure(click.ClickException):
    """A one-line error: bad usage or bad input (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CheckFailed(Failure):
    """A one-line error: verification failed or the run failed, nothing written (exit 1)."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return " ".join(text.split()) or type(exc).__name__


def debug_enabled(ctx: click.Context | None) -> bool:
    if os.environ.get("REPFUSE_DEBUG", "") not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.meta.get(DEBUG_KEY))


def set_debug(ctx: click.Context, _param, value: bool) -> bool:
    """Option callback for ``--debug`` (group level and on every subcommand)."""
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


def set_stage(ctx: click.Context, stage: str) -> None:
    """Record what the command is doing (``load`` errors are input errors: exit 2)."""
    ctx.meta[STAGE_KEY] = stage
