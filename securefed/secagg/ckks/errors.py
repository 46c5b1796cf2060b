"""The CKKS protocol's exceptions: bad messages, bad contexts/parameters, missing or exposed key
files. Every module of :mod:`securefed.secagg.ckks` raises these (re-exported there)."""

from __future__ import annotations

from securefed.errors import SecurefedError

__all__ = [
    "CKKSContextError",
    "CKKSKeyFileError",
    "CKKSKeyPermissionError",
    "CKKSMessageError",
]


class CKKSMessageError(ValueError):
    """A protocol message failed a check. ``client`` is the sender (``"server"`` for aggregates)."""

    def __init__(self, client: int | str, check: str, detail: str) -> None:
        self.client = client
        self.check = check
        who = client if isinstance(client, str) else f"client {client}"
        super().__init__(f"{who}: {check} check failed: {detail}")


class CKKSContextError(SecurefedError, ValueError):
    """Invalid CKKS parameters, an unreadable context, or contexts that do not belong together."""


class CKKSKeyFileError(SecurefedError, FileNotFoundError):
    """A CKKS key file is missing (the message names the config field and the command)."""


class CKKSKeyPermissionError(SecurefedError, PermissionError):
    """A CKKS secret-key file is accessible to group/others (refused, not just warned)."""
