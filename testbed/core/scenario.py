"""Scenario files: typed models, loading with `--set` overrides, and one clear error per bad file."""

from __future__ import annotations

import difflib
import copy
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from testbed.core.capacity import DEFAULT_MEMORY_BUDGET_BYTES, capacity_problems, format_bytes
from testbed.core.scenario_yaml import ScenarioYamlError, load_scenario_yaml
from testbed.core.units import (
    UnitError,
    parse_duration_s,
    parse_fraction,
    parse_rate_bps,
    parse_size_bytes,
)
from testbed.core.errors import TestbedError
from testbed.core.plugins import (
    DEVICE_PROFILES,
    INDEX_CODECS,
    LINK_BACKENDS,
    LINK_PROFILES,
    STRATEGIES,
    VALUE_CODECS,
)

if TYPE_CHECKING:
    from testbed.core.events import ScenarioEvent


class ScenarioError(TestbedError):
    """A scenario file (or an override) that cannot be run; the message names the field and value."""


def _unit(parser):  # type: ignore[no-untyped-def]
    def parse(value: Any) -> Any:
        try:
            return parser(value)
        except UnitError as error:
            raise ValueError(str(error)) from None

    return BeforeValidator(parse)


RateBps = Annotated[float, _unit(parse_rate_bps)]
DurationSeconds = Annotated[float, _unit(parse_duration_s)]
Fraction = Annotated[float, _unit(parse_fraction)]
SizeBytes = Annotated[int, _unit(parse_size_bytes)]


class SectionModel(BaseModel):
    """A section of a scenario (or a plugin's own settings): unknown keys refused, frozen, no booleans for numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_non_boolean(cls, value: Any, info: Any) -> Any:
        # YAML turns yes/no/on/off/true into booleans; pydantic would quietly read them as 1/0.
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError("expected a value of this field's type, not a boolean")
        return value


class DataSpec(SectionModel):
    """Which data set, and how it arrives round by round."""

    dataset: Literal["digits", "mnist", "cifar10"] = "digits"
    root: Path | None = None
    download: bool = True
    initial_samples: int = Field(300, ge=10)
    new_samples_per_round: int = Field(100, ge=1)
    validation_samples: int = Field(180, ge=10)
    test_samples: int = Field(360, ge=10)
    device_test_samples: int = Field(200, ge=10)


class ModelSpec(SectionModel):
    """The network the server trains and the devices run."""

    kind: Literal["mlp", "vgg", "resnet"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [128, 64])
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    blocks_per_stage: int = Field(1, ge=1, le=32)


class UpdateSpec(SectionModel):
    """How the server updates the deployed model each round.

    The fields are what every strategy shares. Any other key is the chosen strategy's own setting
    (DPU's ``lambda``, ``reinit``, ``checkpoint``, …; full updating's ``full_variant``): kept here as an
    opaque mapping (``settings``), its name checked against the names the strategy declares in
    ``@register_strategy(name, settings=(...))`` (read from source, no import), and its value validated
    by the strategy's own ``Settings`` model (testbed.preflight, and the server when it builds the strategy).
    """

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, allow_inf_nan=False)

    strategy: str = "dpu"
    ratio: Fraction = Field(0.05, gt=0.0, le=1.0)  # 0.05 or 5%
    epochs: int = Field(20, ge=1, le=10_000)
    lr: float = Field(0.005, gt=0.0)
    batch_size: int = Field(64, ge=1)
    round0: Literal["sparse", "full"] = "sparse"
    """Round 0, the first deployment: ``sparse`` runs the strategy itself from w⁰ (a k-sparse update relative to
    w⁰, as the DPU reference does, multiround_dpu.py:209-214); ``full`` trains every weight and sends them all.
    Strategies that send no k-sparse update (``full``, and those registered with ``uses_ratio=False``) deploy a
    full model either way."""
    index_codec: str = "auto"
    value_codec: str = "fp32"
    chunk_size: SizeBytes = Field(1024, alias="chunk_size")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        return STRATEGIES.check(name)

    @field_validator("index_codec")
    @classmethod
    def _known_index_codec(cls, name: str) -> str:
        selectable = [codec for codec in INDEX_CODECS.names() if INDEX_CODECS.attributes(codec).get("selectable", True)]
        if name != "auto" and name not in selectable:
            raise ValueError(f"unknown index codec {name!r}; choose one of auto, {', '.join(selectable)}")
        return name

    @field_validator("value_codec")
    @classmethod
    def _known_value_codec(cls, name: str) -> str:
        return VALUE_CODECS.check(name)

    @model_validator(mode="after")
    def _settings_of_the_strategy(self) -> UpdateSpec:
        declared = STRATEGIES.attributes(self.strategy).get("settings") or ()
        unknown = [key for key in self.settings if key not in declared]
        if unknown:
            # Raised as a ValidationError located at the key, so the path reads update.<key>.
            takes = ", ".join(declared) or "no settings of its own"
            fields = [*declared, *(info.alias or name for name, info in type(self).model_fields.items())]
            details = []
            for key in unknown:
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                error = PydanticCustomError("unknown_setting",
                                            "unknown field for strategy {strategy} (it takes {takes}){hint}",
                                            {"strategy": self.strategy, "takes": takes, "hint": hint})
                details.append(InitErrorDetails(type=error, loc=(key,), input=self.settings[key]))
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self

    @property
    def settings(self) -> dict[str, Any]:
        """The chosen strategy's own keys as written (e.g. ``{"lambda": 0.5}``); its Settings model reads them."""
        return dict(self.model_extra or {})


class GilbertElliottSpec(SectionModel):
    """netem's `loss gemodel p r 1-h 1-k`: bursty loss from a two-state Markov chain."""

    p: Fraction
    r: Fraction | None = None
    one_minus_h: Fraction = Field(1.0, alias="1-h")
    one_minus_k: Fraction = Field(0.0, alias="1-k")


class OutageSpec(SectionModel):
    """A scheduled outage: the link is down from `at` for `duration` (from the link's first use)."""

    at_s: DurationSeconds = Field(alias="at")
    duration_s: DurationSeconds = Field(alias="duration")


class RandomOutageSpec(SectionModel):
    """Random outages: exponential up and down periods with these means."""

    mean_up_s: DurationSeconds = Field(alias="mean_up")
    mean_down_s: DurationSeconds = Field(alias="mean_down")


class LinkSpec(SectionModel):
    """One direction of a link: rate (or a trace), delay distribution, loss model, outages."""

    rate_bps: RateBps | None = Field(None, alias="rate")
    delay_s: DurationSeconds = Field(0.0, alias="delay")
    jitter_s: DurationSeconds = Field(0.0, alias="jitter")
    delay_distribution: Literal["uniform", "normal", "pareto"] = "uniform"
    loss: Fraction = 0.0
    gilbert_elliott: GilbertElliottSpec | None = None
    duplicate: Fraction = 0.0
    reorder: Fraction = 0.0
    outages: list[OutageSpec] = Field(default_factory=list)
    random_outages: RandomOutageSpec | None = None
    trace: Path | None = None
    overhead_bytes: SizeBytes = Field(40, alias="overhead")
    mss_bytes: SizeBytes = Field(1460, alias="mss")
    queue_bytes: SizeBytes | None = Field(None, alias="queue")  # drop-tail bottleneck queue (tun, netem)
    recovery: Literal["fast", "rto"] = "fast"  # TCP loss recovery of the proxy's link model (channel.recovery)

    @field_validator("loss")
    @classmethod
    def _loss_below_one(cls, loss: float) -> float:
        if loss >= 1.0:
            raise ValueError("loss must be below 100% (nothing would ever arrive)")
        return loss

    @model_validator(mode="after")
    def _one_loss_model_one_rate(self) -> LinkSpec:
        if self.gilbert_elliott is not None and self.loss > 0:
            raise ValueError("give either 'loss' (Bernoulli) or 'gilbert_elliott', not both")
        if self.trace is not None and self.rate_bps is not None:
            raise ValueError("give either 'rate' or 'trace' (a trace sets the rate over time), not both")
        return self


CELL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class CellSpec(SectionModel):
    """Devices behind one shared bottleneck per direction (a radio cell), instead of a link each.

    The cell's link is described like the channel's: ``profile`` (else the channel's), and per
    direction ``downlink``/``uplink`` (else the channel's) over it.
    """

    name: str = Field(pattern=CELL_NAME_PATTERN)
    devices: list[str]
    profile: str | None = None
    downlink: LinkSpec | None = None
    uplink: LinkSpec | None = None

    @field_validator("devices")
    @classmethod
    def _some_distinct_devices(cls, devices: list[str]) -> list[str]:
        if not devices:
            raise ValueError("a cell needs at least one device id")
        repeated = sorted({device_id for device_id in devices if devices.count(device_id) > 1})
        if repeated:
            raise ValueError(f"device {repeated[0]!r} is listed twice in this cell")
        return devices

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, name: str | None) -> str | None:
        return _known_channel_profile(name)


def _known_channel_profile(name: str | None) -> str | None:
    return None if name is None else LINK_PROFILES.check(name)


class ChannelSpec(SectionModel):
    """The emulated link between the broker and each device (or each cell of devices, see CellSpec)."""

    backend: str = "proxy"
    profile: str | None = None
    downlink: LinkSpec | None = None
    uplink: LinkSpec | None = None
    reset_after_s: DurationSeconds | None = Field(10.0, alias="reset_after")
    cells: list[CellSpec] = Field(default_factory=list, alias="cells",
                                  validation_alias=AliasChoices("cells", "links"))  # `links:` reads the same

    @field_validator("reset_after_s")
    @classmethod
    def _positive_reset(cls, seconds: float | None) -> float | None:
        if seconds is not None and seconds <= 0:
            raise ValueError("reset_after must be a positive duration (or null: never reset)")
        return seconds

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, name: str | None) -> str | None:
        return _known_channel_profile(name)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        return LINK_BACKENDS.check(name)

    @model_validator(mode="after")
    def _links_consistent(self) -> ChannelSpec:
        """What can be checked without the link plugins (profiles, traces): testbed.preflight checks the rest."""
        names = [cell.name for cell in self.cells]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"cell name {repeated[0]!r} appears twice; give each cell its own name")
        queued = [name for name, link in (("downlink", self.downlink), ("uplink", self.uplink))
                  if link is not None and link.queue_bytes is not None]
        backends = {name: LINK_BACKENDS.attributes(name) for name in LINK_BACKENDS.names()}
        if queued and not backends[self.backend].get("packet_level"):
            packet_level = [name for name, attributes in backends.items() if attributes.get("packet_level")]
            raise ValueError(f"{queued[0]}.queue (a bounded bottleneck queue) works at the packet level, with "
                             f"backend {' or '.join(map(repr, packet_level))}, not {self.backend!r}; choose one of "
                             "them or remove the queue")
        if self.cells and not backends[self.backend].get("shared_cells"):
            sharing = [name for name, attributes in backends.items() if attributes.get("shared_cells")]
            raise ValueError(f"cells (shared links) need backend {' or '.join(map(repr, sharing))}, not "
                             f"{self.backend!r}; use one of them or remove channel.cells")
        return self


class DeviceGroup(SectionModel):
    """Either `count` emulated devices of a profile, or one named device (emulated, or a board in the loop).

    A named device with `serial` is a board on that port (a device path, or socket://host:port for a
    serial server such as ser2net): the run starts its host bridge. With `external: true` the bridge is
    started separately (`testbed attach`, possibly on another host) and the run waits for it to join.
    With `network: true` it is a board on the network running `testbed device`: the run serves the device's
    emulated link on `listen` (loopback unless set; 0.0.0.0 for every interface) and waits for it to join.
    """

    profile: str
    count: int | None = Field(None, ge=1, le=100_000)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    serial: str | None = Field(None, min_length=1)
    baud: int = Field(115200, ge=50, le=4_000_000)
    external: bool = False
    network: bool = False
    listen: str | None = None
    """The address a network device's link endpoint listens on (None: 127.0.0.1)."""

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, name: str) -> str:
        return DEVICE_PROFILES.check(name)

    @field_validator("listen")
    @classmethod
    def _ip_address(cls, host: str) -> str:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"listen must be an IP address of this host (127.0.0.1, 0.0.0.0 for every interface, "
                             f"or one interface's address), got {host!r}") from None
        return host

    @model_validator(mode="after")
    def _count_or_name(self) -> DeviceGroup:
        if self.count is not None and self.name is not None:
            raise ValueError("give either 'count' (a group of emulated devices) or 'name' (one device), not both")
        if (self.serial is not None or self.external or self.network) and self.name is None:
            raise ValueError("a board in the loop ('serial', 'external' or 'network') needs a 'name' "
                             "(one device per board)")
        if self.serial is not None and self.external:
            raise ValueError("give either 'serial' (the run starts the bridge) or 'external: true' "
                             "(`testbed attach` starts it), not both")
        if self.network and (self.serial is not None or self.external):
            raise ValueError("'network: true' (a board on the network running `testbed device`) excludes 'serial' "
                             "and 'external' (a board on a serial line): give one of them")
        if self.listen is not None and not self.network:
            raise ValueError("'listen' is where a network device's link endpoint listens: it needs 'network: true'")
        return self

    @property
    def kind(self) -> str:
        """emulated, serial, external or network."""
        if self.network:
            return "network"
        return "serial" if self.serial is not None else "external" if self.external else "emulated"

    def device_ids(self) -> list[str]:
        """The ids of the devices this entry stands for."""
        if self.name is not None:
            return [self.name]
        return [f"{self.profile}-{index}" for index in range(self.count or 1)]


class TlsSpec(SectionModel):
    """TLS settings for an external broker."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False


class BrokerSpec(SectionModel):
    """`embedded` (amqtt started by the run), `mosquitto` (a local Mosquitto started by the run, testbed.mosquitto)
    or an external MQTT broker URL.

    `username`/`password` are the run's own identity. `device_credentials` names a YAML/JSON file giving
    each device its own (``device-id: password``, or ``device-id: {username, password}``): then every
    device connects as itself and the broker can hold it to its own topics (`testbed broker-config`);
    the embedded broker then checks the identities and enforces those topic rules itself.
    """

    url: str = "embedded"
    username: str | None = None
    password: str | None = None
    tls: TlsSpec | None = None
    device_credentials: Path | None = None

    @model_validator(mode="after")
    def _device_identities_need_the_server_identity(self) -> BrokerSpec:
        if self.device_credentials is not None and not (self.username and self.password):
            raise ValueError("device_credentials needs username and password as well (the run's own identity, "
                             "the only one allowed to publish updates)")
        return self

    @model_validator(mode="after")
    def _local_mosquitto_has_no_tls(self) -> BrokerSpec:
        if self.local_mosquitto and self.tls is not None:
            raise ValueError("tls does not apply to the local mosquitto (it listens on 127.0.0.1 without TLS): drop "
                             "it, or run Mosquitto yourself with a TLS listener and give its mqtts:// url")
        return self

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        if url in ("embedded", "mosquitto"):
            return url
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ValueError("broker must be 'embedded', 'mosquitto' or mqtt://host[:port] / mqtts://host[:port], "
                             f"got {url!r}")
        try:
            port = parsed.port
        except ValueError:
            raise ValueError(f"bad port in broker url {url!r}") from None
        if port == 0:
            raise ValueError(f"bad port in broker url {url!r}")
        return url

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"

    @property
    def local_mosquitto(self) -> bool:
        return self.url == "mosquitto"

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)

    @property
    def uses_tls(self) -> bool:
        return self.tls is not None or urlparse(self.url).scheme == "mqtts"


def _broker_from_shorthand(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


class MetricsSpec(SectionModel):
    """The Prometheus exporter of the run."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    pushgateway: str | None = None
    targets_dir: Path | None = None
    """Where the run registers its exporter for Prometheus (file_sd); None: testbed.prometheus_targets' default."""

    @field_validator("pushgateway")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"pushgateway must be an http(s)://host:port URL, got {url!r}")
        return url


class FleetSpec(SectionModel):
    """Where the emulated devices run: `workers` processes of this host, and devices a `testbed fleet` runs elsewhere.

    `workers: N` runs the emulated devices in N worker processes (each with its devices' links and agents; a
    cell's devices on one worker); `auto` starts one per core when the fleet has more than 200 emulated devices
    and keeps it in process otherwise (testbed.core.fleet_plan). `remote` lists device selectors (`rpi4-0..99`, a
    cell name, a device id) that `testbed fleet --devices SELECTOR` runs on another host: the run waits for them.
    """

    workers: int | Literal["auto"] = 1
    remote: list[str] = Field(default_factory=list)

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_or_positive(cls, workers: Any) -> Any:
        if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int)
                                  or not 1 <= workers <= 1024):
            raise ValueError(f"workers must be 'auto' or a number of processes from 1 to 1024, got {workers!r}")
        return workers


class Scenario(SectionModel):
    """A whole experiment: data, model, update strategy, channel, devices, broker, metrics."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    rounds: int = Field(ge=1, le=10_000)
    round_timeout_s: DurationSeconds = Field(300.0, alias="round_timeout")
    round_period_s: DurationSeconds = Field(60.0, alias="round_period", gt=0)
    """Modelled time between two rounds (how often new data arrive): a device's idle energy is counted over it."""
    memory_budget: SizeBytes = DEFAULT_MEMORY_BUDGET_BYTES  # what the run may hold (testbed.core.capacity)
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    update: UpdateSpec = Field(default_factory=UpdateSpec)
    channel: ChannelSpec = Field(default_factory=ChannelSpec)
    devices: list[DeviceGroup] = Field(min_length=1)
    broker: Annotated[BrokerSpec, BeforeValidator(_broker_from_shorthand)] = Field(default_factory=BrokerSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    events: list[ScenarioEvent] = Field(default_factory=list)  # timed faults (testbed.core.events)
    fleet: FleetSpec = Field(default_factory=FleetSpec)

    @field_validator("devices")
    @classmethod
    def _unique_device_ids(cls, devices: list[DeviceGroup]) -> list[DeviceGroup]:
        seen: set[str] = set()
        for device_id in (device_id for group in devices for device_id in group.device_ids()):
            if device_id in seen:
                raise ValueError(f"device id {device_id!r} appears twice; give named devices distinct names")
            seen.add(device_id)
        return devices

    @model_validator(mode="after")
    def _cells_hold_known_devices_once(self) -> Scenario:
        known = self.device_ids()
        cell_of: dict[str, int] = {}
        for index, cell in enumerate(self.channel.cells):
            for device_id in cell.devices:
                where = f"channel.cells.{index}.devices"
                if device_id not in known:
                    raise ValueError(f"{where}: {device_id!r} is not a device of this scenario "
                                     f"(its devices: {', '.join(known)})")
                if device_id in cell_of:
                    raise ValueError(f"{where}: device {device_id!r} is already in cell "
                                     f"channel.cells.{cell_of[device_id]}; a device can be in one cell only")
                cell_of[device_id] = index
        return self

    @model_validator(mode="after")
    def _fits_the_data_and_the_memory(self) -> Scenario:
        """Samples and rounds the data set holds, a model that fits `memory_budget` (testbed.core.capacity)."""
        budget = f"memory_budget ({format_bytes(self.memory_budget)})"
        problems = capacity_problems(self, self.memory_budget, budget)
        if problems:
            # Raised as a ValidationError located at each field, so the path reads e.g. data.initial_samples.
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("capacity", "{problem}", {"problem": problem.message}),
                                 loc=problem.location, input=problem.value) for problem in problems
            ])
        return self

    @model_validator(mode="after")
    def _events_fit_the_scenario(self) -> Scenario:
        """Rounds, devices, cells and boards the events name are the scenario's (testbed.core.events)."""
        from testbed.core.event_checks import check_events

        return check_events(self)

    @model_validator(mode="after")
    def _fleet_fits_the_scenario(self) -> Scenario:
        """`fleet.remote` selects emulated devices; events act only on devices the run's own process holds."""
        from testbed.core.fleet_checks import fleet_problem

        problem = fleet_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    def remote_devices(self) -> list[str]:
        """The emulated devices `testbed fleet` runs on other hosts (`fleet.remote`), in scenario order."""
        from testbed.core.fleet_plan import select_devices

        cells = {cell.name: cell.devices for cell in self.channel.cells}
        return [device_id for selector in self.fleet.remote
                for device_id in select_devices(selector, self.device_ids(), cells)]

    def device_ids(self) -> list[str]:
        """Every device id of the run, in scenario order."""
        return [device_id for group in self.devices for device_id in group.device_ids()]

    def device_entries(self) -> dict[str, DeviceGroup]:
        """Device id -> the entry it comes from (its kind, port and baud)."""
        return {device_id: group for group in self.devices for device_id in group.device_ids()}

    def device_profiles(self) -> dict[str, str]:
        """Device id -> profile name."""
        return {device_id: group.profile for group in self.devices for device_id in group.device_ids()}

    def to_yaml(self) -> str:
        """The resolved scenario as YAML (units in SI numbers: bit/s, seconds, fractions, bytes)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def _format_location(location: tuple[Any, ...]) -> str:
    parts = [str(part) for part in location if not str(part).startswith(("function-", "function-after"))]
    return ".".join(parts) or "<top level>"


SHOWN_VALUE_CHARS = 200


def _shown(value: Any) -> str:
    """The offending value as an error shows it: its repr, cut to SHOWN_VALUE_CHARS (a huge value stays one line)."""
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else f"{text[:SHOWN_VALUE_CHARS]}… ({len(text):,} characters)"


def _fields_at(location: tuple[Any, ...]) -> list[str]:
    """The field names (aliases) the scenario accepts beside the last part of `location` ([] if unknown)."""
    model: Any = Scenario
    for part in location[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = next((info for name, info in model.model_fields.items() if part in (name, info.alias)), None)
        if field is None:
            return []
        model = _model_in(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (through Optional, list, dict values, Annotated), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _override_of(location: str, overrides: list[str]) -> str | None:
    """The last `--set` that wrote `location` (or a section holding it), if one did."""
    for assignment in reversed(overrides):
        path = assignment.partition("=")[0].strip()
        if location == path or location.startswith(path + ".") or path.startswith(location + "."):
            return assignment
    return None


def _format_validation_error(error: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    lines = [f"{source}: invalid scenario"]
    for detail in error.errors():
        location = _format_location(tuple(detail["loc"]))
        message = detail["msg"].removeprefix("Value error, ")
        if detail["type"] == "extra_forbidden":
            message = "unknown field"
            close = difflib.get_close_matches(str(detail["loc"][-1]), _fields_at(tuple(detail["loc"])), n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        value = detail.get("input")
        shown = "" if detail["type"] == "missing" or isinstance(value, dict) else f" (got {_shown(value)})"
        if shown and f"got {value!r}" in message:
            shown = ""  # the message already shows the value
        override = _override_of(location, overrides or []) if detail["loc"] else None
        if override is not None:
            shown += f" (set by --set {override})"
        # a whole-scenario check names its own field path in the message
        lines.append(f"  {location}: {message}{shown}" if detail["loc"] else f"  {message}")
    return "\n".join(lines)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `path.to.field=value` override to a raw scenario mapping (value parsed as YAML)."""
    if "=" not in assignment:
        raise ScenarioError(f"--set {assignment!r}: expected path=value, e.g. update.ratio=0.01")
    path, _, text = assignment.partition("=")
    keys = path.strip().split(".")
    if not all(keys):
        raise ScenarioError(f"--set {assignment!r}: empty field name in {path!r}")
    try:
        value = load_scenario_yaml(text)
    except ScenarioYamlError as error:
        raise ScenarioError(f"--set {assignment!r}: the value is {error}") from None
    node: Any = raw
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ScenarioError(f"--set {assignment!r}: {where} is not an index of a list of {len(node)}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ScenarioError(f"--set {assignment!r}: {'.'.join(keys[:depth])} is a value, not a section")


def parse_scenario(raw: Any, source: str = "<scenario>", overrides: list[str] | None = None) -> Scenario:
    """Validate a raw mapping (as from YAML) with optional overrides into a Scenario."""
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: a scenario must be a mapping of fields, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return Scenario.model_validate(raw)
    except ValidationError as error:
        raise ScenarioError(_format_validation_error(error, source, overrides or [])) from None


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario file; every problem is one ScenarioError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ScenarioError(f"{path}: cannot read scenario file: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ScenarioError(f"{path}: scenario file is not UTF-8 text: {error}") from None
    try:
        raw = load_scenario_yaml(text)
    except ScenarioYamlError as error:
        raise ScenarioError(f"{path}: {error}") from None
    return parse_scenario(raw, str(path), overrides)


# The events section builds on the sections above; importing it completes Scenario (its `events` field).
import testbed.core.events  # noqa: E402,F401
