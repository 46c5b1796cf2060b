"""The one base class of the errors a user can fix (the bottom layer: imports nothing).

Every error that means "this input or this stored state is wrong" derives from
:class:`SecurefedError` as well as from the builtin it always was (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so ``except ValueError`` keeps working. The CLI catches
this one class (``securefed <command>: error: <message>``, exit 2, no traceback) instead of
importing every module that defines one (importing the audit only for its error types cost about
1.5 s on every command).

Protocol faults a site or the coordinator handles itself (a forged message, a refused round, a
bad share) are not user errors and do not derive from it.
"""

from __future__ import annotations

__all__ = ["SecurefedError"]


class SecurefedError(Exception):
    """Input or stored state a user can fix: a config field, a data file, a key file, a threat
    model, a ledger, a checkpoint, a node or worker setting. The message names the field or
    file, the value and the fix."""
