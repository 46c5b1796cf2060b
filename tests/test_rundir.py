"""One owner of the run directory: RunDir's paths, and no other module spells them."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import securefed
from securefed.artefacts import Checkpoint, RunDir, released_params

#: the run directory's file and folder names (RunDir owns them)
NAMES = {
    "config.yaml", "metrics.jsonl", "label_histogram.json", "model.json", "privacy_ledger.json",
    "dp_noise.key", "public_pretrain.json", "stopped.json", "report.md", "status.json",
    "sites.json", "checkpoints", "auxiliary", "holdout.png", "secrets",
}  # (not "samples", "received", "canaries": also config values and audit target names)


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return [
        (n.lineno, n.value) for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_no_module_but_rundir_spells_a_run_directory_name() -> None:
    root = Path(securefed.__file__).parent
    owner = root / "artefacts" / "rundir.py"
    offenders = [
        f"{p.relative_to(root.parent)}:{line}: {value!r}"
        for p in sorted(root.rglob("*.py")) if p != owner
        for line, value in _code_strings(p) if value in NAMES
    ]
    assert not offenders, "use securefed.artefacts.RunDir instead:\n" + "\n".join(offenders)


def test_rundir_paths_are_distinct_and_inside_the_run(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    props = [n for n, v in vars(RunDir).items() if isinstance(v, property)]
    paths = [getattr(rd, n) for n in props]
    assert len(set(paths)) == len(paths)
    assert all(p.is_relative_to(rd.root) for p in paths)
    assert {p.name for p in paths} >= NAMES - {"holdout.png"}
    assert rd.sample_grid(3).name == "round_0003.png" and rd.is_new() and not rd.is_run()


def test_released_params_are_what_the_checkpoint_records() -> None:
    g, ema = torch.zeros(4), torch.ones(4)
    assert torch.equal(released_params(Checkpoint(1, g, {}, {}, {}, released=ema)), ema)
    assert torch.equal(released_params(Checkpoint(1, g, {}, {}, {})), g)
