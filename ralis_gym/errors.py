"""Exceptions with messages a user can act on."""

from __future__ import annotations


class RalisGymError(Exception):
    """Base class of every error raised on purpose by ralis-gym."""


class DatasetError(RalisGymError, ValueError):
    """A dataset is missing, incomplete or corrupt; the message names the file and the fix."""


class ConfigError(RalisGymError, ValueError):
    """A configuration key or value is invalid."""


class DownloadError(RalisGymError):
    """A download failed or its checksum did not match."""
