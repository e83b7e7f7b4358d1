"""Errors that the CLI turns into one clear line and an exit code.

`UsageError` means the user asked for something that cannot work (exit 2);
`KerasLLMError` is any other failure the user can act on (exit 1). Neither
module imports TensorFlow, so the serving side can raise and catch them.
"""


class KerasLLMError(Exception):
    """A failure with a message meant for the user (exit code 1)."""

    exit_code = 1


class UsageError(KerasLLMError):
    """Bad arguments, paths or configuration (exit code 2)."""

    exit_code = 2


class DataError(KerasLLMError):
    """Input data that cannot be read: missing, empty, not UTF-8, malformed."""


class BundleError(KerasLLMError):
    """A bundle that is incomplete, tampered with or of an unknown format."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP (its number the first argument) arrived while a training or an export ran
    (`kerasllm.signals` turns it into this, as Python turns SIGINT into KeyboardInterrupt): a
    BaseException, so that no `except Exception` swallows it. The CLI exits 128 + the number."""

    exit_code = 143


def in_chain(err: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of `kind` among `err` and what caused it (`__cause__`, else `__context__`),
    or None: an interrupt that a C extension's import turned into "ImportError: initialization failed"
    is still the interrupt."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class ReaderGone(Exception):
    """A batch job's output reader went away (EPIPE: `... | head`, a FIFO's reader). Not an OSError, which
    click turns into exit 1 itself; the CLI ends quietly with 141, as a tool that SIGPIPE ends."""
