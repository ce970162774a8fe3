"""The project's exceptions.

Every error a user can cause or fix is one of these, raised with a message that names the
file or option at fault and says what to do. The CLI prints the message on one line and
exits with the class's ``exit_code``; nothing else is caught silently.
"""

from __future__ import annotations

import logging


class PisaError(Exception):
    """Base class: a problem the user can act on, explained in ``str(error)``."""

    exit_code = 1


class OptionsError(PisaError):
    """An option value that cannot work (out of range, contradictory)."""

    exit_code = 2


class ModelError(PisaError):
    """The base model (SD 2.1-base) is missing, incomplete or of the wrong shape."""

    exit_code = 3


class WeightsError(PisaError):
    """The PiSA-SR checkpoint is missing, corrupt, unsafe or does not fit the base model."""

    exit_code = 3


class ImageError(PisaError):
    """One input image cannot be read or one output cannot be written; the batch goes on."""

    exit_code = 1


class DeviceError(PisaError):
    """The requested device or precision is not available on this machine."""

    exit_code = 2


class OutOfMemoryError(PisaError):
    """A stage ran out of memory even with its smallest tile; this image fails, others go on."""

    exit_code = 1


class NonFiniteError(PisaError):
    """A stage gave inf or NaN even in fp32 (damaged weights): this image fails, nothing of
    it is written or recorded, others go on."""

    exit_code = 1


class LaunchError(PisaError):
    """A multi-process launch cannot work: bad rank variables, no process group, a lost rank."""

    exit_code = 1


def describe_error(source: object, error: BaseException) -> str:
    """One line naming ``source`` (an input file) and what went wrong with it: the message
    of our own errors, "out of memory", or an internal error (its traceback goes to the
    debug log). The one describer of per-image failures (upscale and sweep)."""
    if isinstance(error, ImageError):
        return str(error)  # names its file already
    if isinstance(error, PisaError):
        return f"{source}: {error}"
    if isinstance(error, MemoryError):
        return f"{source}: out of memory"
    logging.getLogger("pisa_cli").debug("unexpected failure on %s", source, exc_info=error)
    return f"{source}: internal error ({type(error).__name__}: {error})"
