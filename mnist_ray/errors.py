"""The one exception type for user mistakes: the CLI prints it on one line and exits 1."""


class MnistRayError(Exception):
    """A problem the user can fix (bad path, bad flag, missing data); the message says how."""


def raised_in_worker(error: BaseException) -> str | None:
    """The sentence of the MnistRayError behind ``error``: raised here, or by a Ray worker (an
    actor or a Train worker whose TensorFlow sees no GPU) and found in the error Ray hands the
    driver; None if there was none.

    Ray passes the worker's exception on as a cause (``__cause__``, or a task error's ``cause``),
    or (a failed actor) only as traceback text.
    """
    todo = [error, *getattr(error, "worker_failures", {}).values()]  # Ray Train: rank -> exception
    seen: set[int] = set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MnistRayError):
            return str(e)
        for line in str(e).splitlines():
            if "MnistRayError: " in line:
                return line.split("MnistRayError: ", 1)[1].strip()
        todo += [c for c in (getattr(e, "cause", None), e.__cause__) if isinstance(c, BaseException)]
    return None
