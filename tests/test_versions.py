"""The supported versions (fastft/versions.py): CI's two environments stay at the ends of the ranges, and a version
outside a range is an error naming it when a model is loaded."""
import importlib
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from fastft import versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins(filename: str) -> dict[str, Version]:
    """``name==version`` lines of a requirements file."""
    found = {}
    with open(os.path.join(ROOT, filename)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                requirement = Requirement(line)
                spec = str(requirement.specifier)
                if spec.startswith("=="):
                    found[requirement.name] = Version(spec[2:])
    return found


def test_oldest_environment_pins_every_lower_bound():
    oldest = pins("requirements-oldest.txt")
    for name, spec in versions.REQUIREMENTS.items():
        if ">=" in spec:
            assert oldest.get(name) == Version(versions.lower_bound(name)), \
                f"requirements-oldest.txt must pin {name}=={versions.lower_bound(name)} (fastft/versions.py: {spec})"


def test_main_environment_is_inside_every_range():
    tested = pins("requirements-cpu.txt")
    for name in versions.REQUIREMENTS:
        if name in tested:
            assert versions.unsupported(name, str(tested[name])) is None


def test_installed_versions_are_supported():
    versions.check_installed()


@pytest.mark.parametrize("name, version, supported", [
    ("transformers", "5.16.1", False), ("transformers", "6.0.0", False), ("transformers", "6.0.0.dev0", False),
    ("transformers", "5.17.0", True), ("transformers", "5.99.0.dev0", True),
    ("torch", "2.9.1+cu128", False), ("torch", "2.10.0a0+git1234", True), ("torch", "2.10.0+cu128", True),
    ("triton", "3.5.1", False), ("peft", "0.19.1", False), ("bitsandbytes", "0.49.2", False),
    ("trl", "1.15.0", False), ("trl", "2.0.0", False),
])
def test_each_checked_package_names_its_range(monkeypatch, name, version, supported):
    monkeypatch.setattr(importlib.import_module(name), "__version__", version)
    if supported:
        versions.check_installed()
    else:
        message = f"fastft supports {name}{versions.REQUIREMENTS[name]}; found {name} {version}"
        with pytest.raises(ImportError, match=re.escape(message)):
            versions.check_installed()


def test_setup_py_declares_the_table(tmp_path):
    """The package metadata setup.py writes (what pip resolves against) holds the table's ranges."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    info = tmp_path / "fastft.egg-info"
    requires = (info / "requires.txt").read_text().split("\n\n[")[0].split()  # the lines before the extras
    assert list(map(Requirement, requires)) == list(map(Requirement, versions.install_requires()))
    assert f"Requires-Python: {versions.PYTHON}" in (info / "PKG-INFO").read_text()
