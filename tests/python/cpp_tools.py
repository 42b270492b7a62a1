"""The C++ programs that Python tests drive (built with the tests: LORAFUSE_BUILD_DIR/bin)."""

import os

import pytest


def cpp_program(name: str = "lorafuse_llama_adapters") -> str:
    """The path of the built C++ example `name`; fails under LORAFUSE_REQUIRE_CPP_TOOLS=1 (scripts/test.sh) when it
    is missing, else skips."""
    roots = [os.environ.get("LORAFUSE_BUILD_DIR", ""), "build/cmake", "build"]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in roots:
        if not root:
            continue
        path = os.path.join(root if os.path.isabs(root) else os.path.join(here, root), "bin", name)
        if os.access(path, os.X_OK):
            return path
    if os.environ.get("LORAFUSE_REQUIRE_CPP_TOOLS") == "1":
        pytest.fail(f"{name} was not built (LORAFUSE_BUILD_DIR/bin)")
    pytest.skip(f"the C++ example {name} is not built here")
