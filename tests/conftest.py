import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEDPIX = ROOT.parent / "shared" / "medpix" / "MedPix-2-0"


@pytest.fixture(scope="session")
def lvm():
    """The script as a module (its file name has hyphens, so it cannot be imported by name)."""
    spec = importlib.util.spec_from_file_location("light_weight_vlm", ROOT / "light-weight-vlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_run(lvm, tmp_path_factory):
    """One full `--demo` run with the default output folders, inside a fresh working directory."""
    workdir = tmp_path_factory.mktemp("demo")
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        metrics = lvm.main(["--demo"])
    finally:
        os.chdir(previous)
    return workdir, metrics
