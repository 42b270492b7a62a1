"""The installed package stands on its own: its module loads the library beside it, not one in a build folder."""

import os
import sys

import pytest

import lorafuse


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_module_loads_the_library_installed_beside_it():
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if line.rstrip().endswith("liblorafuse.so")}
    here = os.path.realpath(os.path.join(os.path.dirname(lorafuse.__file__), "liblorafuse.so"))
    assert {os.path.realpath(p) for p in mapped} == {here}
