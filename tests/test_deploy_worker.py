"""The site worker and the flwr 1.41 polling patches (no processes; see test_deploy.py for the
loopback deployment that runs them)."""

from __future__ import annotations

import io
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from securefed.deploy import polling
from securefed.deploy.worker import (
    CLIENTAPP_REF,
    SiteWorker,
    WorkerConfigError,
    fab_clientapp,
    load_auth_secret,
    write_auth_secret,
)

#: deployment tests (Flower processes, sites, the deploy protocol): in `make test`, left out
#: of `make test-unit`
pytestmark = pytest.mark.deploy

APP = Path(__file__).resolve().parents[1] / "securefed" / "deploy" / "app" / "pyproject.toml"


@pytest.fixture
def sci(monkeypatch: pytest.MonkeyPatch) -> Any:
    """flwr's SuperNode loop module, restored after the test whatever it patched."""
    from flwr.supernode import start_client_internal as mod

    monkeypatch.setattr(mod, "time", mod.time)
    monkeypatch.setattr(mod, "pull_objects", mod.pull_objects)
    return mod


def test_poll_patch_applies_to_flwr_1_41_only_where_it_means_to(
    sci: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr
    from flwr.supercore.inflatable import inflatable_utils

    assert flwr.__version__.startswith("1.41.")
    assert polling.poll_patch_applicable() is None
    shim = polling.apply_poll_patch(0.05, 0.01)
    assert sci.time is shim
    assert sci.pull_objects.func is inflatable_utils.pull_objects
    assert sci.pull_objects.keywords == {"initial_backoff": 0.01, "backoff_cap": 0.05}
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    sci.time.sleep(0.5)  # the reply poll; a message is being served
    sci.time.sleep(3)  # the idle poll: short within the grace period after a message
    clock[0] += 9.0
    sci.time.sleep(3)
    clock[0] += 2.0  # nothing for 11 s: each further empty pull waits 25% longer
    sci.time.sleep(3)
    sci.time.sleep(3)
    sci.time.sleep(1.25)  # anything else is untouched
    assert slept == pytest.approx([0.01, 0.05, 0.05, 0.05, 0.0625, 1.25])
    for _ in range(40):  # idle for long: back to Flower's own 3 s, never longer
        sci.time.sleep(3)
    assert slept[-1] == 3 and max(slept) == 3
    sci.time.sleep(0.5)  # a message again: short polls again
    sci.time.sleep(3)
    assert slept[-1] == 0.05
    assert sci.time.perf_counter is time.perf_counter  # the rest of time is the real module
    # applying twice is harmless
    assert polling.apply_poll_patch(0.05, 0.01).idle == 0.05


def test_poll_patch_refuses_another_flwr_and_a_changed_loop(
    sci: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr

    original = sci.time
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    assert "flwr 1.42.0 is not 1.41.x" in str(polling.poll_patch_applicable())
    with pytest.raises(polling.PatchError, match=r"1\.42\.0"):
        polling.apply_poll_patch(0.1, 0.02)
    assert sci.time is original  # nothing was changed
    monkeypatch.setattr(flwr, "__version__", "1.41.0")

    def changed_loop() -> None:  # a 1.41.x whose loop no longer sleeps 3 s
        time.sleep(1)

    monkeypatch.setattr(sci, "start_client_internal", changed_loop)
    assert "exactly one time.sleep(3)" in str(polling.poll_patch_applicable())
    with pytest.raises(polling.PatchError):
        polling.apply_poll_patch(0.1, 0.02)
    assert sci.time is original
    with pytest.raises(ValueError, match="--idle-poll 5"):
        polling.apply_poll_patch(5, 0.02)


def test_securefed_supernode_falls_back_or_refuses_on_another_flwr(
    sci: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    import flwr

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    started: list[list[str]] = []
    monkeypatch.setattr(cli, "flower_supernode", lambda: started.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    args = ["--idle-poll", "0.2", "--superlink", "h:9092", "--isolation", "process"]
    assert polling.main(args) == 0  # patched, the rest handed to flower-supernode as is
    assert started[-1] == ["flower-supernode", "--superlink", "h:9092", "--isolation", "process"]
    assert isinstance(sci.time, polling.PollingTime) and sci.time.idle == 0.2
    monkeypatch.setattr(sci, "time", time)
    monkeypatch.setattr(flwr, "__version__", "1.42.1")
    assert polling.main(["--poll-patch", "require", "--superlink", "h:9092"]) == 2
    assert len(started) == 1  # refused: never started
    assert polling.main(["--poll-patch=auto", "--superlink", "h:9092"]) == 0  # stock fallback
    assert sci.time is time and len(started) == 2
    assert polling.main(["--poll-patch", "sometimes"]) == 2


def test_grid_pull_patch_is_version_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    monkeypatch.setattr(flwr, "__version__", "1.40.0")
    assert "1.40.0" in str(polling.apply_grid_pull_patch())
    assert http_grid.pull_objects is inflatable_utils.pull_objects
    monkeypatch.setattr(flwr, "__version__", "1.41.0")
    assert polling.apply_grid_pull_patch() is None
    assert http_grid.pull_objects.keywords["initial_backoff"] == polling.PULL_BACKOFF


def test_auth_secret_is_required_private_and_long(tmp_path: Path) -> None:
    p = write_auth_secret(tmp_path / "runtime.secret")
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert len(load_auth_secret(p)) == 32
    with pytest.raises(FileExistsError):
        write_auth_secret(p)
    os.chmod(p, 0o644)
    with pytest.raises(WorkerConfigError, match="chmod 600"):
        load_auth_secret(p)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    os.chmod(short, 0o600)
    with pytest.raises(WorkerConfigError, match="3 bytes"):
        load_auth_secret(short)
    with pytest.raises(WorkerConfigError, match="auth secret is required"):
        SiteWorker("127.0.0.1:9094", b"")
    from securefed.cli import main

    assert main(["site-worker", "--runtime-api-address", "127.0.0.1:1"]) == 2  # no secret


def _fab(pyproject: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return buf.getvalue()


def test_worker_serves_only_the_securefed_clientapp() -> None:
    text = APP.read_text()
    assert fab_clientapp(_fab(text)) == CLIENTAPP_REF
    other = text.replace(CLIENTAPP_REF, "evil.app:app")
    assert fab_clientapp(_fab(other)) == "evil.app:app"


def test_warm_up_imports_the_site_handlers_but_not_tenseal() -> None:
    """Before: the warm-up imported torch only, so the run's first message also paid for
    importing the handlers, builders and DP trainer (seconds at every site)."""
    import subprocess

    code = (
        "import sys; from securefed.deploy.worker import SiteWorker; "
        "SiteWorker.warm_up(None); "
        "missing = [m for m in ('torch', 'flwr.clientapp', 'securefed.deploy.node', "
        "'securefed.builders', 'securefed.client.trainer') if m not in sys.modules]; "
        "assert not missing, missing; assert 'tenseal' not in sys.modules"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert res.returncode == 0, res.stderr
