"""The C++ programs that Python tests drive (built with the tests; where: scripts/common.py's built_program)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts"))
from common import built_program  # noqa: E402


def cpp_program(name: str = "lorafuse_llama_adapters") -> str:
    """The path of the built C++ example `name`; fails under LORAFUSE_REQUIRE_CPP_TOOLS=1 (scripts/test.sh) when it
    is missing, else skips."""
    path = built_program(name)
    if path is not None:
        return path
    if os.environ.get("LORAFUSE_REQUIRE_CPP_TOOLS") == "1":
        pytest.fail(f"{name} was not built (LORAFUSE_BUILD_DIR/bin)")
    pytest.skip(f"the C++ example {name} is not built here")
