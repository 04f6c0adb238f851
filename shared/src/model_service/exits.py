"""Naming how a child process ended (worker processes, ComfyUI)."""

import signal


def signal_name(exitcode: int) -> str:
    """`SIGKILL` for -9 (the negative exit codes of `subprocess`/`multiprocessing`)."""
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return "unknown signal"


def was_killed(exitcode: int | None) -> bool:
    """SIGKILL: usually the kernel's out-of-memory killer, or an operator."""
    return exitcode is not None and -exitcode == signal.SIGKILL
