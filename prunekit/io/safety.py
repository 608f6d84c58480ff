"""Output-location safety: which directories a run may create or replace, one lock per output, removal of
scratch folders that killed runs left behind, and an atomic swap that never leaves the output path empty.

Rules (docs/guide.md, "Safety"): an output may not be, contain or lie inside the input model, nor be the
current directory or one of its parents; an existing non-empty output is replaced only with ``overwrite``
and only when it is a previous prunekit output (its ``run.json`` lists every file in it). The new output
is written to ``.NAME.partial-*`` beside the output and published with ``renameat2(RENAME_NOREPLACE)``
(new output) or ``renameat2(RENAME_EXCHANGE)`` (``--overwrite``) on Linux: one atomic step either way.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import sys
import time
from pathlib import Path

from prunekit.errors import EnvironmentFault, UserError
from prunekit.runtime.paths import expand_path

MANIFEST = "run.json"
SCRATCH_TAGS = ("partial", "old")
SCRATCH_RANDOM = 8  # characters tempfile.mkdtemp appends to a scratch folder's prefix
PAUSE_ENV = "PRUNEKIT_TEST_PAUSE"  # test-only: "POINT=FLAGFILE" pauses a run at a named point (kill tests)
# What save_pretrained and tokenizers write; only consulted for run.json files that predate the file list.
_SAVED_PATTERNS = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                   "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "*.py")

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
_held: dict[Path, int] = {}  # output -> fd of its lock file, while this process owns that output


# ---------------------------------------------------------------------------------------------- paths




def _absolute(path: Path) -> Path:
    """The absolute path with every existing symlink resolved (the file system's view of it)."""
    return Path(os.path.realpath(path))


def _scratch_names(output: Path) -> list[Path]:
    """Scratch folders beside ``output`` that a run writing it creates (``.NAME.partial-*``, ``.NAME.old-*``)."""
    parent = output.parent
    if not parent.is_dir():
        return []
    return sorted(p for tag in SCRATCH_TAGS for p in parent.glob(f".{output.name}.{tag}-*"))


# ------------------------------------------------------------------------------------------- ownership


def foreign_entries(output: Path) -> list[str] | None:
    """Names in ``output`` prunekit did not write; ``None`` when it holds no valid prunekit ``run.json``."""
    try:
        data = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "config" not in data or "versions" not in data:
        return None
    names = {entry.name for entry in output.iterdir()}
    listed = data.get("files")
    if isinstance(listed, list):
        return sorted(names - set(map(str, listed)) - {MANIFEST})
    return sorted(n for n in names if n != MANIFEST and not (
        any(fnmatch.fnmatchcase(n, pattern) for pattern in _SAVED_PATTERNS) and (output / n).is_file()))


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system holding ``folder`` allows (255 where it does not say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_name_length(output: Path) -> None:
    """Refuse an output name the file system cannot hold with prunekit's scratch suffix (``.NAME.partial-XXXXXXXX``
    beside it), before any work rather than as ENAMETOOLONG when saving."""
    parent = next((p for p in (output.parent, *output.parent.parents) if p.is_dir()), Path("/"))
    limit = _name_max(parent)
    longest = len(os.fsencode(f".{output.name}.{SCRATCH_TAGS[0]}-")) + SCRATCH_RANDOM
    if longest > limit:
        room = limit - (longest - len(os.fsencode(output.name)))
        raise UserError(f"output: the name {output.name[:40]}... is {len(os.fsencode(output.name))} bytes long; "
                        f"the file system allows {limit} and prunekit writes beside it under '.NAME.partial-XXXXXXXX', "
                        f"so use a name of at most {room} bytes")


def _lock_free(output: Path) -> bool:
    """Whether no other process holds ``output``'s lock (so scratch folders beside it are left from a killed run)."""
    output = _absolute(output)
    if output in _held:
        return True
    try:
        fd = os.open(output.parent / f".{output.name}.lock", os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the lock this probe may have taken


def leftovers(output: Path) -> str:
    """For a refusal of ``output``: scratch folders a killed run left beside it, removed when provably stale (no
    process holds the output's lock), as a clause to append (empty when there are none)."""
    stale = _scratch_names(output)
    if not stale:
        return ""
    if not _lock_free(output):
        return f" ({', '.join(p.name for p in stale)} beside it belong to a prunekit run that is writing it now)"
    removed, kept = [], []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        (kept if path.exists() else removed).append(path)
    said = f"; removed {', '.join(p.name for p in removed)}, left beside it by an interrupted run" if removed else ""
    if kept:
        said += (f"; {', '.join(p.name for p in kept)} left by an interrupted run could not be removed: "
                 f"rm -rf {' '.join(repr(str(p)) for p in kept)}")
    return said


def check_output(output: Path, overwrite: bool, model_source: str | os.PathLike | None = None) -> None:
    """Refuse, with one line naming ``output``, any location a run must not write (see the module docstring)."""
    output = expand_path(output, "output")
    check_name_length(output)
    if output.is_symlink():
        raise UserError(f"output: {output} is a symbolic link; give the directory itself")
    target = _absolute(output)
    if model_source is not None and str(model_source).strip():
        model = _absolute(expand_path(model_source, "model"))
        if model.exists():
            model = model if model.is_dir() else model.parent
            if target == model:
                raise UserError(f"output: {output} is the input model; choose another directory")
            if model in target.parents:
                raise UserError(f"output: {output} lies inside the input model {model}; choose a directory outside it")
            if target in model.parents:
                raise UserError(f"output: {output} contains the input model {model}; choose a directory that does not")
    try:
        cwd = _absolute(Path.cwd())
    except FileNotFoundError:  # the current directory was deleted: nothing of it to protect
        cwd = None
    if cwd is not None and (target == cwd or target in cwd.parents):
        raise UserError(f"output: {output} is the current directory or one of its parents; "
                        f"choose a new directory (e.g. ./pruned)")
    if output.exists() and not output.is_dir():
        raise UserError(f"output: {output} exists and is not a directory")
    ancestor = next(p for p in (target, *target.parents) if p.exists())
    if not ancestor.is_dir():
        raise UserError(f"output: {ancestor} is a file, so {output} cannot be created")
    if not os.access(ancestor if ancestor != target else target.parent, os.W_OK | os.X_OK):
        raise UserError(f"output: no permission to write in {ancestor if ancestor != target else target.parent}")
    if output.is_dir() and not os.access(output, os.W_OK | os.X_OK):
        raise UserError(f"output: {output} cannot be replaced: it is not writable (read-only, immutable or another "
                        f"user's; see lsattr and ls -ld); choose another directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UserError(f"output: {output} exists and is not empty; pass --overwrite to replace a previous "
                            f"prunekit output, or choose another directory{leftovers(output)}")
        refuse_foreign(output)


def refuse_foreign(output: Path) -> None:
    """Refuse to replace a non-empty directory unless every file in it is one prunekit wrote."""
    foreign = foreign_entries(output)
    if foreign is None:
        raise UserError(f"output: {output} has no prunekit {MANIFEST}, so it is not a prunekit output; "
                        f"--overwrite only replaces prunekit outputs (choose another directory){leftovers(output)}")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"output: {output} holds files prunekit did not write ({shown}); --overwrite only replaces "
                        f"prunekit outputs (move them or choose another directory){leftovers(output)}")


# ------------------------------------------------------------------------------------------------ lock


def claim(output: Path) -> list[str]:
    """Lock ``output`` for this process (re-entrant) and remove scratch folders killed runs left beside it.

    The lock is an ``flock`` on ``.NAME.lock`` beside the output, so the kernel drops it when the process
    dies, even by SIGKILL. Does nothing while the parent folder does not exist (then nothing can race
    yet; publishing refuses to replace an output that appeared meanwhile). Returns what it removed.
    """
    output = _absolute(output)
    if output in _held or not output.parent.is_dir():
        return []
    lock = output.parent / f".{output.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"output: cannot create a lock file in {output.parent} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"output: another prunekit run (pid {owner}) is writing {output}; wait for it "
                            f"or choose another --output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous owner unlinked while we waited for it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[output] = fd
    return remove_stale(output)


def release(output: Path | None = None) -> None:
    """Give up the lock on ``output`` (every output this process holds when None) and delete its lock file."""
    targets = list(_held) if output is None else [_absolute(output)]
    for target in targets:
        fd = _held.pop(target, None)
        if fd is None:
            continue
        try:
            os.unlink(target.parent / f".{target.name}.lock")
        except OSError:
            pass
        os.close(fd)


def remove_stale(output: Path) -> list[str]:
    """Remove ``.NAME.partial-*`` / ``.NAME.old-*`` beside ``output`` (call only while holding its lock).

    Says on stderr what it removed, or the command that removes what it could not.
    """
    removed = []
    for path in _scratch_names(output):
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            print(f"prunekit: note: cannot remove {path} left by an interrupted run; remove it with: rm -rf "
                  f"'{path}'", file=sys.stderr)
        else:
            removed.append(path.name)
    if removed:
        print(f"prunekit: note: removed {len(removed)} folder(s) left by an interrupted run beside {output}: "
              f"{', '.join(removed)}", file=sys.stderr)
    return removed


# ---------------------------------------------------------------------------------------------- publish


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """Linux ``renameat2``; NotImplementedError where libc or the file system lacks it."""
    func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if func is None:
        raise NotImplementedError
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise NotImplementedError
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def publish(scratch: Path, output: Path) -> Path | None:
    """Move the finished ``scratch`` to ``output`` in one atomic step; returns where the old output now is.

    No output yet: rename without replacing (a directory that appeared meanwhile is refused, not
    replaced). Existing output: exchange the two, so ``output`` always names a complete directory; the old
    one ends up at ``scratch``. Without ``renameat2`` (not Linux, some file systems) two renames are used.
    """
    if not os.path.lexists(output):
        try:
            _renameat2(scratch, output, _RENAME_NOREPLACE)
        except NotImplementedError:
            os.rename(scratch, output)  # POSIX may replace an empty directory that appeared meanwhile
        except FileExistsError:
            raise UserError(f"output: {output} appeared while this run worked (another run?); nothing was "
                            f"replaced and this run's result was not saved") from None
        return None
    try:
        _renameat2(scratch, output, _RENAME_EXCHANGE)
        return scratch
    except NotImplementedError:
        old = scratch.with_name(scratch.name.replace(".partial-", ".old-"))
        os.rename(output, old)
        os.rename(scratch, output)
        return old


def fix_mode(scratch: Path) -> None:
    """``mkdtemp`` makes 0700 folders and some writers (safetensors) 0600 files; give the folder and every file
    in it the permissions a plain ``mkdir`` and ``open`` would, so colleagues can read a shared output."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o777 & ~umask)
    for path in scratch.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# ------------------------------------------------------------------------------------------ disk space


def check_space(output: Path, needed: int, what: str) -> None:
    """An :class:`EnvironmentFault` when the file system ``output`` goes to has less than ``needed`` bytes free."""
    folder = next((p for p in _absolute(output).parents if p.is_dir()), Path("/"))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise EnvironmentFault(f"output: not enough disk space in {folder} for {what} "
                               f"(needs about {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free)")


def os_error(exc: OSError, output: Path) -> Exception:
    """The one-line error for an OSError met while writing ``output``: a full disk is the machine's fault."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
        return EnvironmentFault(f"output: writing {output} failed ({reason}); nothing was saved")
    return UserError(f"output: cannot write {output} ({reason}); nothing was saved")


def pause_point(point: str) -> None:
    """Test-only: with ``PRUNEKIT_TEST_PAUSE=POINT=FLAGFILE`` a run writes FLAGFILE at POINT and waits to be killed."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, flag = spec.partition("=")
    if name != point or not flag:
        return
    Path(flag).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
