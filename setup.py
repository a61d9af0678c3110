# setuptools needs a setup.py for cffi_modules; everything else is in pyproject.toml.  Which
# extensions are built (dataplane._native always; _dpdk when libdpdk is found and DATAPLANE_DPDK
# is not 0; _testing when DATAPLANE_TESTING=1) is decided once, in native/build.py.
import importlib.util
from pathlib import Path

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "dataplane_native_build", Path(__file__).resolve().parent / "native" / "build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

setup(cffi_modules=_build.cffi_modules())
