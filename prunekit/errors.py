"""Errors that reach the user as one clear line and exit code 2 (no traceback)."""


class UserError(Exception):
    """Bad input or a missing resource the user can fix; the message says which field and what is accepted."""


class EvaluationFailed(Exception):
    """The "after" evaluation failed or was interrupted; the pruned model was saved anyway (with the error
    in run.json). ``output`` is where, ``manifest`` what was written, ``interrupted`` whether it was Ctrl-C."""

    def __init__(self, output, manifest: dict, error: BaseException):
        self.output, self.manifest, self.error = output, manifest, error
        self.interrupted = isinstance(error, KeyboardInterrupt)
        what = "interrupted" if self.interrupted else f"failed ({type(error).__name__}: {error})"
        super().__init__(f"evaluation after pruning {what}; the pruned model was saved to {output} "
                         f"and run.json records the error")


class EnvironmentFault(Exception):
    """A fault of the machine rather than the input (a full disk, an I/O error): one line, exit code 1."""


def one_line(text: object, limit: int = 400) -> str:
    """``text`` on one line (every run of whitespace, newlines included, becomes one space), cut at the end of
    a sentence or a word when longer than ``limit`` characters, so a message is never cut mid-word."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    head = flat[:limit]
    end = max(head.rfind(". "), head.rfind(": "), head.rfind("; "))
    if end >= limit // 2:
        return head[: end + 1] + " …"
    return head[: head.rfind(" ")].rstrip(",;:") + " …" if " " in head else head + "…"
