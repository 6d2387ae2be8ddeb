"""User-facing errors.

A `VoxgenError` carries one line that names the file or key at fault and what is wrong.
The command line prints it as `error: ...` and exits with code 2, without a traceback.
"""

from __future__ import annotations


class VoxgenError(Exception):
    """An error the user can fix: bad path, corrupt file, impossible config."""


class ConfigError(VoxgenError):
    """A config key is unknown, mistyped or inconsistent with another."""


class DataError(VoxgenError):
    """A data folder or file is missing, corrupt or inconsistent."""


class CheckpointError(VoxgenError):
    """A checkpoint is missing, incomplete or unreadable."""


class TrainingCollapsed(VoxgenError):
    """Training degenerated: the model's predictions lost their spread (it predicts the mean)."""


class TrainingDiverged(VoxgenError):
    """Training cannot go on: weights or losses stay non-finite, rollbacks do not help."""


class WriteError(VoxgenError):
    """A file could not be written: disk full, read-only folder, I/O error."""
