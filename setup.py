"""setup.py only drives CMake (CMakeLists.txt is the one build) and puts its outputs into the package.

Environment: LORAFUSE_CUDA=auto|0|1, TORCH_CUDA_ARCH_LIST, MAX_JOBS, LORAFUSE_BUILD_DIR (default
build/cmake), LORAFUSE_BUILD_TESTS=1 to build the Catch2 tests in the same tree.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = os.path.abspath(os.environ.get("LORAFUSE_BUILD_DIR", os.path.join(ROOT, "build", "cmake")))
        tests = "ON" if os.environ.get("LORAFUSE_BUILD_TESTS", "0") not in ("", "0", "OFF", "off") else "OFF"
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir,
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DLORAFUSE_BUILD_TESTS={tests}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
        ]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            configure += ["-G", "Ninja"]
        subprocess.check_call(configure)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "--build", build_dir, "--parallel", jobs])

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(out_dir, exist_ok=True)
        lib_dir = os.path.join(build_dir, "lib")
        for path in glob.glob(os.path.join(lib_dir, "_C*.so")) + [os.path.join(lib_dir, "liblorafuse.so")]:
            shutil.copy2(path, out_dir)


setup(ext_modules=[Extension("lorafuse._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
