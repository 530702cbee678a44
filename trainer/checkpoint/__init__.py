"""Orbax checkpoints of a run: parameters, optimiser state, the data
stream's position and the config, under `WORKDIR/checkpoints/STEP/`.

Saves are asynchronous and atomic (Orbax writes into a temporary folder and
renames it when complete), so a run killed mid-save resumes from the previous
complete checkpoint; the killed save's temporary folder is removed when the
next run opens the folder for writing.

Every checkpoint carries checksums of what it holds (item `checksums`): two
32-bit sums over each array's bits, computed on the devices where the array
lives (so the same whatever the sharding), and SHA-256 of the JSON items.
A restore recomputes them; a mismatch, or a checkpoint that cannot be read,
is a `CorruptCheckpoint`. Resuming, a run sets such a checkpoint aside as
`checkpoints/corrupt-STEP` and resumes from the newest one that verifies.

A `gs://` run directory is Orbax's own: it writes there through TensorStore's
GCS driver and marks each complete step with a commit file. Orbax writes
`s3://` as a local folder, so an s3:// run's checkpoints are saved into the
process's local stage and each complete one is uploaded, its commit marker
last (`Mirrored`); a step without the marker is not a checkpoint to anyone.

A file per concern: checksums, mirror (the manager; S3), cadence (saving,
and what a failed save says), restore (with fallback), best (the best model
so far), steps (which checkpoint a path names).
"""

from trainer.checkpoint.best import BEST, best_value, save_best
from trainer.checkpoint.cadence import Cadence, PeerLost, SaveFailed, save, save_params
from trainer.checkpoint.checksums import (CHECKSUMS, CorruptCheckpoint, array_checksums,
                                          json_checksum, verify)
from trainer.checkpoint.mirror import Mirrored, manager
from trainer.checkpoint.restore import (CORRUPT, load_config, load_params, restore_train_state,
                                        set_aside, step_dir)
from trainer.checkpoint.steps import candidates, find

__all__ = ["BEST", "best_value", "save_best", "Cadence", "PeerLost", "SaveFailed", "save",
           "save_params", "CHECKSUMS", "CorruptCheckpoint", "array_checksums", "json_checksum",
           "verify", "Mirrored", "manager", "CORRUPT", "load_config", "load_params",
           "restore_train_state", "set_aside", "step_dir", "candidates", "find"]
