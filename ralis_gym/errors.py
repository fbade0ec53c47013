"""Exceptions with messages a user can act on.

The rule: a mistake in what a user chose (an argument, a config key or value, a file they named)
raises ``ConfigError``; missing, incomplete or corrupt data raises ``DatasetError``. Both subclass
``ValueError``. A plain ``ValueError`` is left for broken internal invariants (tensor shapes passed
between components, region ids out of range: a bug, not a user error) and for low-level decoders
whose callers re-raise it with context (the annotation RLE decoders). The CLI prints every
``RalisGymError`` as one line (``ralis_gym.cli.main``).
"""

from __future__ import annotations


class RalisGymError(Exception):
    """Base class of every error raised on purpose by ralis-gym."""


class DatasetError(RalisGymError, ValueError):
    """A dataset is missing, incomplete or corrupt; the message names the file and the fix."""


class ConfigError(RalisGymError, ValueError):
    """A configuration key or value, or an argument a user chose, is invalid."""


class DownloadError(RalisGymError):
    """A download failed or its checksum did not match."""
