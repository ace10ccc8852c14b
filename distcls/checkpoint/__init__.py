"""Checkpoints: the format (format.py), the files on disk (files.py), and the checkpointer that
saves and restores a run's stateful components under one policy (checkpointer.py)."""
from distcls.checkpoint.checkpointer import Checkpointer, SaveReason
from distcls.checkpoint.files import CheckpointFiles, ResumePoint
from distcls.checkpoint.format import (
    ENTRIES, FORMAT_VERSION, GlobalRNG, check_compatible, read_checkpoint, resume_reason, rng_state, set_rng_state,
    validate_checkpoint,
)

__all__ = [
    "Checkpointer", "SaveReason", "CheckpointFiles", "ResumePoint", "ENTRIES", "FORMAT_VERSION", "GlobalRNG",
    "check_compatible", "read_checkpoint", "resume_reason", "rng_state", "set_rng_state", "validate_checkpoint",
]
