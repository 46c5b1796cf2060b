"""Function-level imports only where a lazy import is deliberate (issue 16).

Every ``import`` / ``from ... import`` inside a function body of ``securefed/`` must carry a
comment starting with ``# lazy:`` and a reason, on the import's (first) line or on the line
directly above it, e.g. ``import tenseal as ts  # lazy: optional heavy extension``. Imports
at module level, in class bodies and under ``if TYPE_CHECKING:`` are not function-level and
are not checked. The reasons that count as deliberate are listed in docs/ARCHITECTURE.md
"Layers" and issue 16: optional or heavy third-party dependencies, a fast ``securefed --help``,
and (for securefed itself) an import that would break the layer contract or cycle when hoisted.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "securefed"
MARK = "# lazy:"

#: files exempt from the rule (none: every function-level import is hoisted or marked)
ALLOWED: frozenset[str] = frozenset()


def _comment_lines(source: str) -> dict[int, str]:
    """Line number (1-based) -> the text of the comment token on that line (strings excluded)."""
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


def unmarked_function_imports(source: str, filename: str = "<string>") -> list[int]:
    """Line numbers of the imports inside function bodies of ``source`` without a ``# lazy:``.

    A multi-line import counts by its first line; the mark may be the comment on that line or
    a comment line directly above it. Nested functions and methods count too."""
    tree = ast.parse(source, filename=filename)
    comments = _comment_lines(source)
    lines = source.splitlines()
    bad: set[int] = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            line = node.lineno
            here = comments.get(line, "")
            above = comments.get(line - 1, "") if line >= 2 else ""
            above_is_comment_line = line >= 2 and lines[line - 2].lstrip().startswith("#")
            if here.startswith(MARK) or (above_is_comment_line and above.startswith(MARK)):
                continue
            bad.add(line)
    return sorted(bad)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_checker_flags_unmarked_and_accepts_marked() -> None:
    src = (
        "import os\n"  # module level: not checked
        "def f():\n"
        "    import json\n"  # 3: unmarked
        "    import tenseal as ts  # lazy: optional heavy extension\n"
        "    # lazy: flwr is only needed by deployments\n"
        "    from flwr.app import (\n"
        "        Message,\n"
        "    )\n"
        "    from a import (  # lazy: reason on the first line of a multi-line import\n"
        "        b,\n"
        "    )\n"
        "    x = '# lazy: inside a string is no comment'; import re\n"  # 12: unmarked
        "    # lazy: the mark belongs to the line directly above only\n"
        "\n"
        "    import csv\n"  # 15: unmarked
        "    from c import (\n"  # 16: unmarked (a mark on a later line of it does not count)
        "        d,  # lazy: wrong line\n"
        "    )\n"
        "class C:\n"
        "    import abc\n"  # class body: not function-level
        "    def m(self):\n"
        "        def inner():\n"
        "            import zlib  # no mark\n"  # 23: unmarked, nested
        "        import math  # lazy:reason without a space still starts with the mark\n"
        "async def g():\n"
        "    import uuid  # lazy? not the mark\n"  # 26: unmarked
    )
    assert unmarked_function_imports(src) == [3, 12, 15, 16, 23, 26]


def test_allow_list_names_existing_modules() -> None:
    root = PACKAGE.parent
    missing = sorted(p for p in ALLOWED if not (root / p).is_file())
    assert not missing, f"ALLOWED names files that do not exist: {missing}; fix or drop them"


def test_every_function_level_import_is_marked_lazy() -> None:
    root = PACKAGE.parent
    offenders: list[str] = []
    for path in _modules():
        rel = path.relative_to(root).as_posix()
        if rel in ALLOWED:
            continue
        for line in unmarked_function_imports(path.read_text(encoding="utf-8"), rel):
            offenders.append(f"{rel}:{line}")
    assert not offenders, (
        f"{len(offenders)} function-level import(s) without a '{MARK} <reason>' comment "
        "(hoist them to module level, or mark a deliberate lazy import on its line or the line "
        "above):\n" + "\n".join(offenders)
    )

