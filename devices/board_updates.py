"""A board's deployed model, whatever carries its updates (serial frames or MQTT): deploy, verify and swap, evaluate, measure.

The serial board agent (devices.board_agent) and the network board (devices.network_board) share it: the
pinned-key check, building the model from the run's config, resuming a saved version, the energy phases,
apply-on-a-copy then swap, and the fields of the report. The transport only moves bytes and adds its own
byte counts to the report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devices.agent import InferenceModel
from devices.board_energy import BoardEnergy
from devices.board_state import BoardStateStore
from devices.energy_meters import EnergyMeter, PhaseEnergy
from devices.errors import DeviceError
from devices.profiles import DeviceProfile
from devices.update_receiver import CompletedUpdate, UpdateReceiver, UpdateTrust
from testbed.core.messages import BoardConfig, DeviceNack, DeviceReport
from testbed.core.signing import SigningKeyError, TrustedKey
from testbed.core.wire import weights_hash

logger = logging.getLogger("devices.board")

BoardSetup = Callable[[BoardConfig], InferenceModel]
"""Builds the model and the local test split a board runs (testbed.hil_commands.board_inference)."""


class BoardConfigRefused(DeviceError):
    """The board will not take part as configured: a key it does not trust, a bad key, a model it cannot build."""


@dataclass
class Deployment:
    """A configured board: its run, its model and what it holds."""

    config: BoardConfig
    inference: InferenceModel
    receiver: UpdateReceiver


@dataclass(frozen=True)
class AppliedUpdate:
    """An update verified and swapped in, evaluated, with the energy measured since the previous report."""

    completed: CompletedUpdate
    accuracy: float
    apply_s: float
    evaluate_s: float
    energy: PhaseEnergy
    completed_at: float
    """time.monotonic() when its last piece arrived (the report says how long the board took from there)."""


class BoardUpdates:
    """What a board holds (`deployment`) and its measured energy (`energy`, sampled by `energy.run()`).

    `trusted_key` pins the run's key (`--trust`, named by `pin_option` in the refusal): a config naming
    another key is refused, so a host or broker that is not the run's server cannot make the board apply
    anything. The model held is saved after every apply (`state`), so a rebooted board resumes from it.
    """

    def __init__(self, board_name: str, profile: DeviceProfile, meter: EnergyMeter, setup: BoardSetup,
                 state: BoardStateStore | None = None, trusted_key: TrustedKey | None = None,
                 pin_option: str = "testbed board --trust") -> None:
        self.board_name = board_name
        self.profile = profile
        self.setup = setup
        self.state = state
        self.trusted_key = trusted_key
        self.pin_option = pin_option
        self.energy = BoardEnergy(meter)
        self.deployment: Deployment | None = None
        self.resumed_version: int | None = None
        """The saved version the latest deployment resumed from (None: it started from version 0)."""

    def check_trust(self, config: BoardConfig) -> None:
        """BoardConfigRefused if the config's key is malformed or not the pinned one."""
        try:
            run_key = TrustedKey.from_text(config.public_key)
        except SigningKeyError as error:
            raise BoardConfigRefused(f"bad config: {error}") from None
        if self.trusted_key is not None and run_key != self.trusted_key:
            raise BoardConfigRefused(
                f"run {config.run} signs its updates with key {run_key.key_id}…, but this board trusts only "
                f"{self.trusted_key.key_id}… ({self.pin_option}); give the run that key's signing key "
                "(testbed run --signing-key)")

    def holds(self, config: BoardConfig) -> bool:
        """Whether the board is deployed already for this run, device and key."""
        current = self.deployment
        return current is not None and (current.config.run, current.config.device, current.config.public_key) == (
            config.run, config.device, config.public_key)

    async def deploy(self, config: BoardConfig) -> None:
        """Build the config's model (off the event loop) and load the saved version of this run and device, if any;
        BoardConfigRefused (what failed) otherwise, the previous deployment kept."""
        try:
            inference = await asyncio.to_thread(self.setup, config)
            receiver = UpdateReceiver(inference.initial_weights(), config.init_seed,
                                      UpdateTrust(config.run, TrustedKey.from_text(config.public_key)))
            saved = self.state.load(config.run, config.device) if self.state else None
            if saved is not None:
                receiver.restore(saved.version, saved.weights)
            await asyncio.to_thread(inference.load_weights, receiver.weights)
        except Exception as error:  # noqa: BLE001 — any setup failure is the board's answer to the run
            logger.exception("board %s: cannot set up for %s", self.board_name, config.device)
            raise BoardConfigRefused(f"board cannot set up: {error!r}") from error
        self.deployment = Deployment(config, inference, receiver)
        self.resumed_version = saved.version if saved is not None else None

    def deployed(self) -> Deployment:
        if self.deployment is None:
            raise BoardConfigRefused(f"board {self.board_name} is not configured yet")
        return self.deployment

    @property
    def rejected_updates(self) -> int:
        return self.deployment.receiver.rejected_updates if self.deployment else 0

    # --- energy phases ------------------------------------------------------------------------------------

    def begin_receiving(self) -> None:
        """An update's message arrived: the board is receiving (unless it is busy with something else)."""
        if self.energy.phase == "idle":
            self.energy.begin_phase("receive")

    def end_receiving(self, pieces_held: bool = False) -> None:
        """Back to idle once nothing is being received (no transfer in flight, no piece held by the transport)."""
        if not pieces_held and not (self.deployment is not None and self.deployment.receiver.transfers_in_flight):
            self.energy.begin_phase("idle")

    def drop_transfers(self) -> None:
        """Forget every update in flight (lost with a connection); a board that was receiving is idle again."""
        if self.deployment is not None:
            self.deployment.receiver.drop_transfers()
        if self.energy.phase == "receive":
            self.energy.begin_phase("idle")

    # --- apply and report ---------------------------------------------------------------------------------

    async def apply(self, completed: CompletedUpdate) -> AppliedUpdate:
        """Verify on a copy, swap, save, evaluate (each off the event loop); UpdateRejected (counted) if it does not
        verify, the model held unchanged. Ends in the transmit phase: the caller sends the report, then `idle()`."""
        completed_at = time.monotonic()
        deployment = self.deployed()
        receiver = deployment.receiver
        self.energy.begin_phase("apply")
        version, weights = await asyncio.to_thread(receiver.verify, completed)
        await asyncio.to_thread(deployment.inference.load_weights, weights)
        receiver.commit(version, weights)
        if self.state is not None:
            await asyncio.to_thread(self.state.save, deployment.config.run, deployment.config.device, version, weights)
        apply_s = time.monotonic() - completed_at
        self.energy.begin_phase("evaluate")
        started = time.monotonic()
        accuracy = await asyncio.to_thread(deployment.inference.accuracy)
        evaluate_s = time.monotonic() - started
        self.energy.begin_phase("transmit")
        return AppliedUpdate(completed, float(accuracy), apply_s, evaluate_s, self.energy.close_round(), completed_at)

    def idle(self) -> None:
        self.energy.begin_phase("idle")

    def report(self, applied: AppliedUpdate, *, kind: str, received_bytes: int, transmitted_bytes: int,
               total_received_bytes: int, **transport: Any) -> DeviceReport:
        """The report of an applied update: accuracy, times, measured energy, refusals; the transport's byte counts
        and `transport` fields (e.g. serial_frames_lost, delivery_seconds) added as given."""
        deployment = self.deployed()
        manifest = applied.completed.manifest
        return DeviceReport(
            device=deployment.config.device,
            profile=self.profile.name,
            kind_of_device=kind,
            round=manifest.round_index,
            version=deployment.receiver.version,
            weights_hash=weights_hash(deployment.receiver.weights).hex(),
            accuracy=applied.accuracy,
            update_bytes=len(applied.completed.payload),
            received_bytes=received_bytes,
            transmitted_bytes=transmitted_bytes,
            total_received_bytes=total_received_bytes,
            published_at=manifest.published_at,
            report_delay_seconds=time.monotonic() - applied.completed_at,
            apply_seconds=applied.apply_s,
            evaluate_seconds=applied.evaluate_s,
            **self.energy.report_fields(applied.energy),
            rejected_updates=self.rejected_updates,
            rejected_by_reason=deployment.receiver.rejected_by_reason,
            **transport,
        )

    def nack(self, reason: str, session: int | None = None) -> DeviceNack:
        """Ask the run for a catch-up from the version held (a rejected update, or transfers lost); the caller
        sends it in the transmit phase (`energy.begin_phase`), then `idle()`."""
        deployment = self.deployed()
        return DeviceNack(device=deployment.config.device, version=deployment.receiver.version, reason=reason[:1024],
                          session=session)
