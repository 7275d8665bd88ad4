"""The installed version of scdoloris: a leaf module, which any floor reads without importing the package root."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scdoloris")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
