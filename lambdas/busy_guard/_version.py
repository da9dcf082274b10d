"""The package version, defined once: ``busy_guard.__version__`` and the wheel's metadata both read it
(pyproject.toml: ``[tool.setuptools.dynamic] version``). Releases are git tags ``v<this>``."""

__version__ = "0.2.0"
