"""Syntax trees of the project's files, parsed in a child interpreter.

CPython 3.11 keeps `ast.parse`'s recursion count in state shared by all threads: when another thread
parses while a garbage-collected finalizer hands it the interpreter mid-parse (Python 3.11's
`traceback` parses source lines to place its carets), `ast.parse` raises "SystemError: AST
constructor recursion depth mismatch" (reproduced with two threads). Late in a full run the test
process has other threads, and a CI run failed this way; a fresh child interpreter has none.
"""
import ast
import pickle
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

_CHILD = """
import ast, pickle, sys
paths = sys.stdin.read().split("\\0")
sys.stdout.buffer.write(pickle.dumps({p: ast.parse(open(p, encoding="utf-8").read(), p) for p in paths}))
"""


def parse(paths: Iterable[Path]) -> dict[Path, ast.Module]:
    """{path: its module's syntax tree}; a file that does not parse fails with the child's error."""
    paths = [Path(p) for p in paths]
    if not paths:
        return {}
    done = subprocess.run([sys.executable, "-c", _CHILD], input="\0".join(map(str, paths)).encode(),
                          capture_output=True, check=False)
    assert done.returncode == 0, f"parsing {len(paths)} files failed:\n{done.stderr.decode()}"
    trees = pickle.loads(done.stdout)
    return {p: trees[str(p)] for p in paths}
