"""Which packages the wheel carries; everything else is in pyproject.toml.

``probe`` and its subpackages, plus the repository's top-level ``models/``, ``apps/`` and
``experiments/`` shipped *inside* it as ``probe.models``, ``probe.apps`` and ``probe.experiments``, so
an installed wheel adds one top-level name to site-packages, ``probe`` (``probe.companions`` finds
them in either layout). pyproject.toml alone cannot map a folder to a subpackage found by search."""
from setuptools import find_packages, setup

COMPANIONS = ("models", "apps", "experiments")

packages = find_packages(include=["probe", "probe.*"])
for top in COMPANIONS:
    packages += [f"probe.{name}" for name in find_packages(include=[top, f"{top}.*"])]

setup(packages=packages, package_dir={f"probe.{top}": top for top in COMPANIONS},
      package_data={"probe.experiments": ["README.md"]})
