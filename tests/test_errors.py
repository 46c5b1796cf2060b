"""One base class for user-fixable errors (securefed/errors.py) and how the CLI reports them."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from securefed.cli import main
from securefed.errors import SecurefedError
from tests.helpers import ROOT

#: errors that are NOT a user's input: protocol faults and refusals that a site or the
#: coordinator handles itself (a forged message, a refused round, a bad share, a stale state)
PROTOCOL_FAULTS = {
    "securefed.deploy.canaries.CanaryWireError",
    "securefed.deploy.node.PolicyError",
    "securefed.deploy.state.StateError",
    "securefed.deploy.wire.WireError",
    "securefed.deploy.polling.PatchError",
    "securefed.secagg.base.AggregationAbortedError",
    "securefed.secagg.ckks.errors.CKKSMessageError",
    "securefed.secagg.masking.messages.ProtocolError",
}


def _error_classes() -> list[str]:
    """``module.Class`` of every ``class *Error(...)`` defined in the package."""
    out = []
    for path in sorted((ROOT / "securefed").rglob("*.py")):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                out.append(f"{mod}.{node.name}")
    return out


def test_every_error_is_a_user_error_or_a_listed_protocol_fault() -> None:
    names = _error_classes()
    assert len(names) >= 20  # the scan found the package's errors
    unclassified = []
    for name in names:
        mod, cls = name.rsplit(".", 1)
        if name in PROTOCOL_FAULTS or mod == "securefed.errors":
            continue
        if not issubclass(getattr(importlib.import_module(mod), cls), SecurefedError):
            unclassified.append(name)
    assert not unclassified, (
        f"{unclassified}: derive from securefed.errors.SecurefedError (a user can fix it: the CLI "
        "prints it in one line) or list it in PROTOCOL_FAULTS"
    )
    assert PROTOCOL_FAULTS <= set(names)  # no stale entry


def test_user_errors_keep_their_builtin_base() -> None:
    from securefed.artefacts.checkpoint import CheckpointError
    from securefed.config import ConfigError
    from securefed.secagg.ckks.errors import CKKSKeyFileError

    assert issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, RuntimeError)
    assert issubclass(CKKSKeyFileError, FileNotFoundError)


def test_cli_reports_a_corrupt_ledger_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``securefed budget RUN_DIR`` on a corrupt ledger ended in a LedgerError traceback."""
    (tmp_path / "privacy_ledger.json").write_text("{not json")
    assert main(["budget", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("securefed budget: error: ") and "privacy_ledger.json" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_does_not_import_the_audit_to_catch_errors() -> None:
    """Before: every command imported the audit (about 1.5 s) only for its error types."""
    code = (
        "import sys; from securefed.cli import main; "
        "rc = main(['budget', '--delta', '1e-5', '--sample-rate', '0.01', '--steps', '100', "
        "'--noise-multiplier', '1.0']); "
        "assert rc == 0, rc; "
        "assert 'securefed.audit' not in sys.modules, 'the audit was imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
