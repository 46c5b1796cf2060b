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


def test_sample_grids_match_torchvision_pixel_for_pixel() -> None:
    """The grid writer dropped torchvision (CLI start-up); its images are unchanged: compared
    with the previous implementation (torchvision's make_grid) pixel for pixel."""
    import numpy as np
    from torchvision.utils import make_grid as tv_make_grid

    from securefed.artefacts.grid import make_grid, to_grid_image

    def previous(images: torch.Tensor, nrow: int) -> np.ndarray:  # the code before stop 20
        x = (images.float().clamp(-1, 1) + 1) / 2
        x = torch.nn.functional.interpolate(x, scale_factor=6, mode="nearest")
        grid = tv_make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return arr[..., 0] if np.allclose(arr[..., 0], arr[..., 1]) else arr

    g = torch.Generator().manual_seed(0)
    for n, c, nrow in ((1, 1, 1), (7, 1, 3), (10, 3, 4), (4, 3, 8)):
        x = torch.rand(n, c, 8, 8, generator=g)
        ref = tv_make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
        assert torch.equal(make_grid(x, nrow), ref[:c])
        ours = np.asarray(to_grid_image(x * 2 - 1, nrow))
        assert np.array_equal(ours, previous(x * 2 - 1, nrow)), (n, c, nrow)
