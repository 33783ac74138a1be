"""The exception raised for failures reported by libdynmoe."""

from __future__ import annotations

from . import _capi


class DynMoEError(Exception):
    """A libdynmoe call failed.

    Attributes:
        status: the ``dynmoe_status`` code (one of the ``DYNMOE_ERR_*`` constants).
        status_name: the code's name, e.g. ``"DYNMOE_ERR_IO"``.
        message: the library's message (``dynmoe_last_error()``), naming the file, tensor,
            field or argument at fault.
    """

    def __init__(self, status: int, message: str, status_name: str | None = None):
        self.status = int(status)
        self.status_name = status_name or _capi.STATUS_NAMES.get(self.status, "DYNMOE_ERR_UNKNOWN")
        self.message = message
        super().__init__(f"{self.status_name}: {message}" if message else self.status_name)

    def __reduce__(self):
        return (type(self), (self.status, self.message, self.status_name))


def check(status: int) -> None:
    """Raises :class:`DynMoEError` for a non-OK status, with this thread's last error message.

    Must run on the thread that made the failing call (the message is thread-local).
    """
    if status == _capi.DYNMOE_OK:
        return
    lib = _capi.lib()
    raw = lib.dynmoe_last_error() or b""
    name = lib.dynmoe_status_name(status) or b""
    lib.dynmoe_clear_error()
    raise DynMoEError(status, raw.decode("utf-8", "replace"), name.decode("ascii", "replace") or None)
