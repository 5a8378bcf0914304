"""ELAOMS: Eleven Labs Agents Open Memory System."""

from importlib.metadata import PackageNotFoundError, version

SERVICE_NAME = "Eleven Labs Agents Open Memory System (ELAOMS)"

try:
    __version__ = version("elaoms")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
