"""A board's deployed model on disk, so that a reboot resumes from the version it held (atomic replace)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from devices.errors import DeviceError

STATE_FILE = "state.json"
SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class BoardStateError(DeviceError):
    """The state folder cannot be written."""


@dataclass(frozen=True)
class SavedModel:
    """What a board held when it last applied an update."""

    run_id: str
    device_id: str
    version: int
    weights: dict[str, np.ndarray]


class BoardStateStore:
    """One folder per board name: `state.json` names the weights file of the version held.

    `save` writes the weights to a new file, then replaces `state.json` with `os.replace`, so a power cut
    at any moment leaves either the old or the new state, never a mix. Unreadable state is ignored (the
    board then starts from version 0 and the run sends it a catch-up).
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    def load(self, run_id: str, device_id: str) -> SavedModel | None:
        """The saved model of this run and device, or None (nothing saved, another run, or unreadable)."""
        try:
            state = json.loads((self.folder / STATE_FILE).read_text())
            if state.get("run") != run_id or state.get("device") != device_id:
                return None
            version = state["version"]
            with np.load(self.folder / state["weights"], allow_pickle=False) as archive:
                weights = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            return None
        return SavedModel(run_id, device_id, version, weights)

    def save(self, run_id: str, device_id: str, version: int, weights: dict[str, np.ndarray]) -> None:
        """Durably record `weights` as `version` (replacing the previous state atomically)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            weights_name = f"weights-{SAFE_NAME.sub('_', run_id)}-v{version}.npz"
            temporary = self.folder / (weights_name + ".tmp")
            with open(temporary, "wb") as handle:
                np.savez(handle, **weights)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.folder / weights_name)
            state = self.folder / (STATE_FILE + ".tmp")
            state.write_text(json.dumps({"run": run_id, "device": device_id, "version": version,
                                         "weights": weights_name}))
            os.replace(state, self.folder / STATE_FILE)
        except OSError as error:
            raise BoardStateError(f"cannot save the board's model to {self.folder}: {error}") from None
        for old in self.folder.glob("weights-*.npz"):
            if old.name != weights_name:
                old.unlink(missing_ok=True)
