"""The one exception type for user mistakes: the CLI prints it on one line and exits 1."""


class MnistRayError(Exception):
    """A problem the user can fix (bad path, bad flag, missing data); the message says how."""


def raised_in_worker(error: BaseException) -> str | None:
    """The sentence of a MnistRayError that a Ray worker raised (an actor or a Train worker whose
    TensorFlow sees no GPU), found in the error Ray hands the driver; None if there was none.

    Ray passes the worker's exception on as a cause, or (a failed actor) only as traceback text.
    """
    todo = [error, *getattr(error, "worker_failures", {}).values()]  # Ray Train: rank -> exception
    while todo:
        e = todo.pop(0)
        if isinstance(e, MnistRayError):
            return str(e)
        for line in str(e).splitlines():
            if "MnistRayError: " in line:
                return line.split("MnistRayError: ", 1)[1].strip()
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return None
