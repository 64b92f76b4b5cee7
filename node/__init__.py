"""Node-wide plumbing: settings, identity and keys, logging, the mode claim, the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlnode")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
