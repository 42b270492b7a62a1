"""python/lorafuse/_C.pyi, the typed Python↔C++ boundary, lists exactly what the native module binds."""

import ast
import os
import types

import lorafuse
from lorafuse import _C

STUB = os.path.join(os.path.dirname(__file__), "..", "..", "python", "lorafuse", "_C.pyi")


def test_stub_names_every_binding_and_nothing_else():
    tree = ast.parse(open(STUB).read())
    declared = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    declared |= {t.target.id for t in tree.body if isinstance(t, ast.AnnAssign)} - {"__version__"}
    # (torch::python::bind_module also adds a submodule "cpp" of helper classes: not a binding of ours)
    bound = {
        n for n in dir(_C) if not n.startswith("__") and not isinstance(getattr(_C, n), types.ModuleType)
    }
    assert declared - bound == set(), "declared in _C.pyi but not bound"
    assert bound - declared == set(), "bound but missing from _C.pyi"
    assert lorafuse.__version__ == _C.__version__
