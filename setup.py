"""Package discovery only (metadata lives in pyproject.toml).

The service lives in ``server/`` but imports as ``atman_server``
(ARCHITECTURE.md); setuptools' declarative config cannot rename a folder
found by ``find``, so the mapping is spelled out here.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["atman_vllm", "atman_vllm.*"])
packages += ["atman_server" + name[len("server"):] for name in find_packages(include=["server", "server.*"])]

setup(packages=packages, package_dir={"atman_server": "server"})
