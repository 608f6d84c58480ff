"""How a command ends when something goes wrong: one line on stderr, an exit code, no traceback.

Exit codes: 2 bad input (:class:`UserError`, a broken model, a path the file system refuses: too long, a
symlink loop, read-only), 1 environment faults (full disk, memory, I/O errors), a failed evaluation after the
pruned model was saved (130 when it was interrupted) and unexpected errors (with a hint to set
``PRUNEKIT_DEBUG=1`` for the traceback), 130 Ctrl-C, 143 SIGTERM, 141 (quietly) when the reader of stdout went
away (``prunekit plugins | head -1``). SIGTERM is turned into an exception so the same cleanup runs as for Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from prunekit.errors import EnvironmentFault, EvaluationFailed, UserError, one_line

DEBUG_ENV = "PRUNEKIT_DEBUG"
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE  # what a shell reports for a process its pipe's reader stopped
# OSErrors that name a path the user gave or a place they can change (exit 2) and faults of the machine (exit 1);
# any other OSError is unexpected and reported as such.
INPUT_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.ETXTBSY}
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                  errno.EBUSY, errno.ESTALE}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the process was, so every ``finally`` cleans up as it does for Ctrl-C."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Terminated()


def _say(message: str) -> None:
    """One line on stderr, whatever newlines the message carried."""
    print("prunekit: " + " ".join(message.split()), file=sys.stderr)


def _stdout_gone() -> bool:
    """Whether stdout's reader has gone away (a pipe whose other end is closed); then stdout is pointed at
    /dev/null so the interpreter's last flush does not report the broken pipe again."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # an in-memory stdout (tests): ask it directly
        try:
            sys.stdout.flush()
            return False
        except BrokenPipeError:
            return True
        except (OSError, ValueError):
            return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
        return False  # stdout is fine: the broken pipe was something else's
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason`` for an OSError, with a hint for the reasons a user can act on."""
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or str(exc)
    hint = {errno.ENAMETOOLONG: "; use a shorter name",
            errno.ELOOP: "; a symbolic link points (through others) at itself",
            errno.EROFS: "; the file system is mounted read-only",
            errno.EPERM: "; the file or folder may be immutable (lsattr) or owned by someone else",
            errno.EACCES: "; check its permissions"}.get(exc.errno, "")
    return f"{where}: {reason}{hint}" if where else f"{reason}{hint}"


def guarded(command: Callable[[], int]) -> int:
    """Run ``command`` with SIGTERM handled like SIGINT; turn every failure into one line and an exit code."""
    import prunekit.io.safety as safety

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return command()
    except UserError as exc:
        _say(f"error: {exc}")
        return 2
    except EnvironmentFault as exc:
        _say(f"error: {exc}")
        return 1
    except EvaluationFailed as exc:  # the pruned model is saved; the evaluation after it is not
        _say(f"error: {exc}")
        return 130 if exc.interrupted else 1
    except FloatingPointError as exc:
        _say(f"error: numerical failure: {exc} (the model or the dtype cannot represent this; try --dtype float32)")
        return 2
    except Terminated:
        _say("terminated (SIGTERM); the input model is untouched and the output is absent or complete")
        return 143
    except KeyboardInterrupt:
        _say("interrupted; the input model is untouched and the output is absent or complete")
        return 130
    except MemoryError:
        _say("error: out of memory (lower calibration.n_samples, calibration.seq_len or batch sizes)")
        return 1
    except BrokenPipeError as exc:
        if _stdout_gone():  # `prunekit plugins | head -1`: the reader has what it wanted
            return BROKEN_PIPE_EXIT
        return _unexpected(exc)
    except OSError as exc:
        if exc.errno in INPUT_ERRNOS:
            _say(f"error: {describe_os_error(exc)}")
            return 2
        if exc.errno in MACHINE_ERRNOS:
            _say(f"error: {describe_os_error(exc)}")
            return 1
        return _unexpected(exc)
    except Exception as exc:
        return _unexpected(exc)
    finally:
        safety.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _unexpected(exc: Exception) -> int:
    """A failure prunekit did not foresee: one line and exit 1, or the traceback with ``PRUNEKIT_DEBUG=1``."""
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        raise exc
    _say(f"internal error: {type(exc).__name__}: {one_line(exc, 300)} (set {DEBUG_ENV}=1 for the traceback)")
    return 1


def check_eval_args(args: argparse.Namespace) -> None:
    """``prunekit eval`` flags that can be refused before a model is loaded (``~`` expanded in place)."""
    from prunekit.runtime.paths import expand_path

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: {args.limit} is not a number of examples; accepted: an integer >= 1 "
                        f"(or --full for every example)")
    if args.limit is not None and args.full:
        raise UserError("--limit: cannot be combined with --full (which uses every example)")
    if args.config is not None:
        args.config = expand_path(args.config, "--config")
    if args.model is not None:
        args.model = str(expand_path(args.model, "--model"))
    if args.json is not None:
        args.json = expand_path(args.json, "--json")
        folder = args.json.parent
        if args.json.is_dir():
            raise UserError(f"--json: {args.json} is a directory; give a file name")
        if not folder.is_dir():
            raise UserError(f"--json: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"--json: no permission to write in {folder}")


def write_json_atomically(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file in the same folder, so ``path`` is never half-written."""
    from prunekit.io.safety import os_error
    from prunekit.runtime.atomic import write_json

    try:
        write_json(path, data)
    except OSError as exc:
        raise os_error(exc, path) from None
