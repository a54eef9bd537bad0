"""The `events:` section of a scenario: timed faults (link changes, outages, crashes, restarts, bad chunks) as typed models.

Each event says *when* (``at:`` a time from the start of the run, or ``round:`` N with an optional
``phase:`` and ``after:`` offset), *what* (``action:``, the discriminator of the union below) and, for
actions that act on devices, *whom* (``device:``, ``cell:`` or ``all: true``). What can be checked on
one event is checked by its model; what needs the whole scenario (rounds, device and cell names, which
devices are serial boards) by ``testbed.core.event_checks``, which ``Scenario`` calls. The schedule that decides when
an event fires is ``testbed.events`` (orchestration); this module only describes the events.

``Scenario`` names ``ScenarioEvent`` in its ``events`` field; this module builds on the sections of
``testbed.core.scenario`` and completes ``Scenario`` once the union exists (the last lines below), so
either module may be imported first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from testbed.core.plugins import LINK_PROFILES
from testbed.core.scenario import DurationSeconds, LinkSpec, Scenario, SectionModel

if TYPE_CHECKING:
    from pydantic import SerializerFunctionWrapHandler

EVENT_PHASES = ("publish", "delivery", "report")
Phase = Literal["publish", "delivery", "report"]
Direction = Literal["both", "downlink", "uplink"]
DEFAULT_BROKER_DOWNTIME_S = 3.0
TIMING_FIELDS = ("at_s", "round", "phase", "after_s")
TARGET_FIELDS = ("device", "cell", "all_devices")


def _field_error(location: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    """A ValidationError located at ``location`` (relative to the model raising it), so the path names the field."""
    error = PydanticCustomError("event", "{message}", {"message": message})
    return ValidationError.from_exception_data("event", [InitErrorDetails(type=error, loc=location, input=value)])


def _written(data: dict[str, Any], key: str) -> Any:
    """A field's value as written, under its alias (``at``) or, as populate_by_name allows, its name (``at_s``)."""
    value = data.get(key)
    return data.get(f"{key}_s") if value is None else value


class LinkChange(LinkSpec):
    """What a `link` event sets: any field of a link direction (LinkSpec), and `profile` to start from a named link.

    Only the fields written count (the others keep the link's current values), and only they are dumped.
    """

    profile: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        # `rate: null` would read as "unlimited" here yet vanish from the dump; a change names a value
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None:
                    raise _field_error((key,), "give a value to set (to undo a trace, set a 'rate'; to undo "
                                               "gilbert_elliott, set 'loss')", value)
        return data

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, name: str | None) -> str | None:
        return None if name is None else LINK_PROFILES.check(name)

    @model_validator(mode="after")
    def _changes_something(self) -> LinkChange:
        if not self.model_fields_set:
            raise ValueError("give at least one link field to set (rate, delay, jitter, loss, gilbert_elliott, "
                             "profile, ...)")
        return self

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        written = {key for name in self.model_fields_set
                   for key in (name, type(self).model_fields[name].alias) if key is not None}
        return {key: value for key, value in data.items() if key in written}

    def changed_fields(self) -> dict[str, Any]:
        """The fields written, by model field name (``rate_bps``, ``delay_s``, ``profile``, ...)."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class EventBase(SectionModel):
    """When an event fires: ``at`` (from the start of the run) or ``round`` (+ ``phase``, + ``after``); never both."""

    action: str
    at_s: DurationSeconds | None = Field(None, alias="at")
    round: int | None = Field(None, ge=0)
    phase: Phase | None = None
    after_s: DurationSeconds | None = Field(None, alias="after")

    # Why an action takes no `for:` (None: it takes one; see its own `for_s` field).
    no_duration_because: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _timing_as_written(cls, data: Any) -> Any:
        """One of `at`/`round`; `phase` and `after` only with `round`; `for` only where it means something."""
        if not isinstance(data, dict):
            return data
        for key in ("for", "for_s"):
            if key in data and cls.no_duration_because is not None:
                raise _field_error((key,), f"{data.get('action')} takes no 'for' ({cls.no_duration_because})",
                                   data[key])
        at, round_index = _written(data, "at"), _written(data, "round")
        if at is not None and round_index is not None:
            raise ValueError("give either 'at' (a time from the start of the run) or 'round' (a round of the run), "
                             "not both")
        if at is None and round_index is None:
            raise ValueError("say when the event fires: 'at: 30s' (from the start of the run) or 'round: N'")
        if round_index is None:
            for key in ("phase", "after", "after_s"):
                if data.get(key) is not None:
                    raise _field_error((key,), f"'{key.removesuffix('_s')}' goes with 'round' (this event fires "
                                               "'at' a time)", data[key])
        return data

    @field_validator("for_s", check_fields=False)
    @classmethod
    def _positive_duration(cls, seconds: float | None) -> float | None:
        if seconds is not None and seconds <= 0:
            raise ValueError("'for' must be a positive duration")
        return seconds

    @property
    def round_phase(self) -> Phase:
        """The phase of ``round`` the event waits for (``publish`` unless written)."""
        return self.phase or "publish"

    @property
    def offset_s(self) -> float:
        """``after``: seconds from reaching the round's phase to firing (0 unless written)."""
        return self.after_s or 0.0

    @property
    def duration_s(self) -> float | None:
        """``for``: how long the action lasts before its end (restore) event; None: no end event."""
        return getattr(self, "for_s", None)

    def target(self) -> dict[str, Any] | None:
        """Whom the event acts on, as written (``{"device": id}``, ``{"cell": name}``, ``{"all": True}``), or None."""
        return None

    def parameters(self) -> dict[str, Any]:
        """The action's own fields as the scenario dump writes them (SI units), without timing and target."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True,
                               exclude={"action", *TIMING_FIELDS, *TARGET_FIELDS})


class TargetedEvent(EventBase):
    """An event acting on devices: exactly one of ``device: ID``, ``cell: NAME`` or ``all: true``."""

    device: str | None = None
    cell: str | None = None
    all_devices: bool = Field(False, alias="all")

    @model_validator(mode="after")
    def _one_target(self) -> TargetedEvent:
        given = [name for name, set_ in (("device", self.device is not None), ("cell", self.cell is not None),
                                         ("all", self.all_devices)) if set_]
        if len(given) != 1:
            said = "none" if not given else " and ".join(repr(name) for name in given)
            raise ValueError(f"{self.action} needs exactly one target: 'device: ID', 'cell: NAME' or 'all: true' "
                             f"(got {said})")
        return self

    @model_serializer(mode="wrap")
    def _without_all_false(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if not self.all_devices:  # `all: false` is what every device- or cell-targeted event would otherwise show
            data.pop("all", None)
            data.pop("all_devices", None)
        return data

    def target(self) -> dict[str, Any] | None:
        if self.device is not None:
            return {"device": self.device}
        if self.cell is not None:
            return {"cell": self.cell}
        return {"all": True}


class LinkEvent(TargetedEvent):
    """Change link fields (one direction or both) of a device, a cell or all; with ``for``, back afterwards."""

    action: Literal["link"]
    set: LinkChange
    direction: Direction = "both"
    for_s: DurationSeconds | None = Field(None, alias="for")


class OutageEvent(TargetedEvent):
    """The link carries nothing for ``for`` (segments are held back; a connection is reset after ``reset_after``)."""

    action: Literal["outage"]
    direction: Direction = "both"
    for_s: DurationSeconds = Field(alias="for")


class PartitionEvent(TargetedEvent):
    """The device is cut off from the broker for ``for``: its connections are dropped and new ones refused."""

    action: Literal["partition"]
    direction: Direction = "both"
    for_s: DurationSeconds = Field(alias="for")


class DeviceCrashEvent(TargetedEvent):
    """The device's agent dies; it restarts from its saved state at once, or after ``for`` (like a reboot)."""

    action: Literal["device_crash"]
    for_s: DurationSeconds | None = Field(None, alias="for")


class DeviceLeaveEvent(TargetedEvent):
    """The device leaves the run (churn) until a ``device_join`` event brings it back."""

    action: Literal["device_leave"]
    no_duration_because: ClassVar[str | None] = "the device stays away until a device_join event brings it back"


class DeviceJoinEvent(TargetedEvent):
    """A device that left (``device_leave``) joins again and catches up."""

    action: Literal["device_join"]
    no_duration_because: ClassVar[str | None] = "a device that joins stays until a device_leave event"


class BoardResetEvent(TargetedEvent):
    """A serial board's bridge drops the line and opens it again (a board unplugged and plugged back): after a second,
    or after ``for`` (a cable pulled out that long)."""

    action: Literal["board_reset"]
    for_s: DurationSeconds | None = Field(None, alias="for")

    @model_validator(mode="after")
    def _one_board(self) -> BoardResetEvent:
        if self.device is None:
            raise ValueError("board_reset resets one serial board: give 'device: NAME'")
        return self


class BrokerRestartEvent(EventBase):
    """The broker stops and starts again ``for`` later (default 3 s); clients reconnect."""

    action: Literal["broker_restart"]
    for_s: DurationSeconds = Field(DEFAULT_BROKER_DOWNTIME_S, alias="for")


class ServerRestartEvent(EventBase):
    """The server process state is dropped and rebuilt from its last checkpoint."""

    action: Literal["server_restart"]
    no_duration_because: ClassVar[str | None] = "the server restarts from its checkpoint at once"


_CHUNKS_NOT_TIME = "it acts on the next 'chunks' chunks, not for a time"


class CorruptEvent(TargetedEvent):
    """Flip ``bits`` bits in each of the next ``chunks`` chunks to the target (after the channel, before the device)."""

    action: Literal["corrupt"]
    chunks: int = Field(ge=1, le=1_000_000)
    bits: int = Field(1, ge=1)
    no_duration_because: ClassVar[str | None] = _CHUNKS_NOT_TIME


class DuplicateEvent(TargetedEvent):
    """Deliver each of the next ``chunks`` chunks to the target twice."""

    action: Literal["duplicate"]
    chunks: int = Field(ge=1, le=1_000_000)
    no_duration_because: ClassVar[str | None] = _CHUNKS_NOT_TIME


class ReorderEvent(TargetedEvent):
    """Deliver the next ``chunks`` chunks to the target in a shuffled order (seeded)."""

    action: Literal["reorder"]
    chunks: int = Field(ge=2, le=1_000_000)
    no_duration_because: ClassVar[str | None] = _CHUNKS_NOT_TIME


EVENT_MODELS: dict[str, type[EventBase]] = {
    "link": LinkEvent, "outage": OutageEvent, "partition": PartitionEvent,
    "device_crash": DeviceCrashEvent, "device_leave": DeviceLeaveEvent, "device_join": DeviceJoinEvent,
    "board_reset": BoardResetEvent, "broker_restart": BrokerRestartEvent, "server_restart": ServerRestartEvent,
    "corrupt": CorruptEvent, "duplicate": DuplicateEvent, "reorder": ReorderEvent,
}
EVENT_ACTIONS = tuple(EVENT_MODELS)


def _locate_without_the_tag(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Validate one event; an error's path reads ``events.N.field`` (pydantic would put the action in between)."""
    if not isinstance(value, (dict, EventBase)):
        raise _field_error((), "an event is a mapping: 'action:', 'at:' or 'round:', and the action's fields", value)
    action = value.get("action") if isinstance(value, dict) else value.action
    if not isinstance(action, str) or action not in EVENT_MODELS:
        if action is None:
            raise _field_error(("action",), f"say what the event does: 'action: {' | '.join(EVENT_ACTIONS)}'", value)
        raise _field_error(("action",), f"unknown action; choose one of {', '.join(EVENT_ACTIONS)}", action)
    try:
        return handler(value)
    except ValidationError as error:
        details = []
        for detail in error.errors():
            location = tuple(detail["loc"])
            if location and location[0] in EVENT_MODELS:
                location = location[1:]
            details.append(InitErrorDetails(type=PydanticCustomError(detail["type"], "{message}",
                                                                     {"message": detail["msg"]}),
                                            loc=location, input=detail.get("input")))
        raise ValidationError.from_exception_data("event", details) from None


def _action_of(value: Any) -> str | None:
    return value.get("action") if isinstance(value, dict) else getattr(value, "action", None)


# A callable discriminator: SectionModel's before-validator on every field rules out the plain `discriminator="action"`.
ScenarioEvent = Annotated[
    Union[tuple(Annotated[model, Tag(action)] for action, model in EVENT_MODELS.items())],  # type: ignore[misc]
    Discriminator(_action_of),
    WrapValidator(_locate_without_the_tag),
]


# Scenario names ScenarioEvent in its `events` field; now that the union exists, complete the model.
Scenario.model_rebuild(_types_namespace={"ScenarioEvent": ScenarioEvent})
