"""Settings: one frozen, validated object loaded from TOML and the environment.

Precedence, lowest first: built-in defaults < the TOML file < ``DICOMNODE_<SECTION>_<KEY>``
environment variables (lists comma-separated). Every problem is reported as a
:class:`~dicomnode.errors.ConfigError` whose one-line message names the key,
e.g. ``listener.port: must be between 1 and 65535, got 70000``.

Relative paths (and a relative SQLite URL) are resolved against the directory
of the configuration file, so a node behaves the same whatever directory it is
started from.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.config.fields import build, field_doc, one_of, positive, type_name
from dicomnode.errors import ConfigError

ENV_CONFIG = "DICOMNODE_CONFIG"
# Relative to the current directory when no configuration file is given.
DEFAULT_DATABASE_URL = "sqlite:///var/dicomnode.db"
ENV_PREFIX = "DICOMNODE_"


_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UID_ROOT_RE = re.compile(r"^[0-9]+(\.[0-9]+)*\.$")
REGEX_PREFIX = "re:"


def _ae_title(value: str) -> str | None:
    if not _AE_RE.match(value) or not value.strip():
        return f"must be a DICOM AE title (1-16 printable characters, no backslash), got {value!r}"
    return None


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"must be between 1 and 65535, got {value}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def _name(value: str) -> str | None:
    if not _NAME_RE.match(value):
        return f"must be a name of letters, digits, '_', '.' or '-' (max 64), got {value!r}"
    return None


def _name_or_empty(value: str) -> str | None:
    return _name(value) if value else None


def _server_name(value: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", value):
        return f"must be a host name or address, got {value!r}"
    return None


def _database_url(value: str) -> str | None:
    if not value.startswith(("sqlite:", "postgresql")):
        return f"must be a sqlite:/// or postgresql+psycopg:// URL, got {value.split(':')[0]!r}"
    return None


def _uid_root(value: str) -> str | None:
    if value and (not _UID_ROOT_RE.match(value) or len(value) > 40):
        return f"must be a UID prefix ending in '.' of at most 40 characters, got {value!r}"
    return None


def _match_rules(value: dict[str, Any]) -> str | None:
    # pydicom's dictionary costs a quarter second to import: only configurations with
    # match rules pay for it, not every CLI start-up.
    from pydicom.datadict import dictionary_has_tag, tag_for_keyword

    for keyword, wanted in value.items():
        tag = tag_for_keyword(keyword)
        if tag is None or not dictionary_has_tag(tag):
            return f"{keyword!r} is not a DICOM keyword"
        for pattern in wanted if isinstance(wanted, list) else [wanted]:
            if not isinstance(pattern, str):
                return f"{keyword}: values must be strings, got {type(pattern).__name__}"
            if pattern.startswith(REGEX_PREFIX):
                try:
                    re.compile(pattern[len(REGEX_PREFIX) :])
                except re.error as exc:
                    return f"{keyword}: bad regular expression {pattern!r}: {exc}"
    return None


def _each(check: Any, what: str) -> Any:
    """Turn a check of one string into a check of a list of them."""

    def check_list(value: list[str]) -> str | None:
        for item in value:
            problem = check(item) if isinstance(item, str) else f"must be a list of {what}"
            if problem:
                return problem
        return None

    return check_list


_ae_titles = _each(_ae_title, "AE titles")


def _networks(value: list[str]) -> str | None:
    for network in value:
        try:
            ipaddress.ip_network(network, strict=False)
        except (TypeError, ValueError):
            return f"must be IP networks such as '10.1.0.0/16' or '::1', got {network!r}"
    return None


def _seconds_by_modality(value: dict[str, Any]) -> str | None:
    for modality, seconds in value.items():
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality):
            return f"{modality!r} is not a Modality value (CT, MR, ...)"
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            return f"{modality}: must be a number of seconds, 0 or more, got {seconds!r}"
    return None


_model_names = _each(_name, "model names")


def _model_limits(value: dict[str, Any]) -> str | None:
    for name, limit in value.items():
        problem = _name(name)
        if problem:
            return problem
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            return f"{name}: must be a whole number of jobs, 1 or more, got {limit!r}"
    return None


@dataclass(frozen=True)
class ListenerSettings:
    """The C-STORE / C-ECHO service class provider."""

    ae_title: str = field(default="DICOMNODE", metadata=field_doc("Our AE title.", _ae_title))
    # Loopback by default: a node is opened to the network on purpose, with its
    # allow-lists filled in, not by starting the example configuration.
    host: str = field(
        default="127.0.0.1",
        metadata=field_doc(
            "Address to listen on; 0.0.0.0 (all interfaces) for scanners and PACS on the "
            "network, with allowed_calling_aets and allowed_networks set."
        ),
    )
    port: int = field(default=11112, metadata=field_doc("TCP port to listen on.", _port))
    max_pdu: int = field(
        default=4 * 2**20,
        metadata=field_doc(
            "Maximum PDU length we accept, in bytes; large PDUs mean fewer round trips. "
            "0 means unlimited.",
            _non_negative,
        ),
    )
    processes: int = field(
        default=1,
        metadata=field_doc(
            "Receiver processes sharing the port (SO_REUSEPORT, Linux); more than one "
            "spreads concurrent associations over CPU cores.",
            positive,
        ),
    )
    max_associations: int = field(
        default=32,
        metadata=field_doc(
            "Concurrent associations per receiver process; more are rejected (transient).",
            positive,
        ),
    )
    max_associations_per_address: int = field(
        default=16,
        metadata=field_doc(
            "Concurrent associations per receiver process from one peer address; more are "
            "rejected (transient), so one stuck device cannot take every slot. 0 means "
            "max_associations.",
            _non_negative,
        ),
    )
    request_timeout_seconds: float = field(
        default=10.0,
        metadata=field_doc(
            "Seconds from connecting for a peer's whole A-ASSOCIATE-RQ (and TLS handshake) "
            "to arrive; until it has, a connection holds no thread and no association slot.",
            positive,
        ),
    )
    max_pending_connections: int = field(
        default=256,
        metadata=field_doc(
            "Connections waiting for their A-ASSOCIATE-RQ, in all; at the limit the oldest "
            "waiting one is closed to make room.",
            positive,
        ),
    )
    max_pending_per_address: int = field(
        default=64,
        metadata=field_doc(
            "Connections waiting for their A-ASSOCIATE-RQ from one peer address; at the "
            "limit that address's oldest waiting one is closed to make room.",
            positive,
        ),
    )
    network_timeout_seconds: float = field(
        default=60.0,
        metadata=field_doc(
            "Seconds an association may stay silent, within a PDU or between messages, "
            "before it is aborted.",
            positive,
        ),
    )
    allowed_calling_aets: list[str] = field(
        default_factory=list,
        metadata=field_doc("Calling AE titles allowed to associate; empty allows any.", _ae_titles),
    )
    allowed_networks: list[str] = field(
        default_factory=list,
        metadata=field_doc(
            "Peer IP networks allowed to associate (e.g. '10.1.0.0/16'); empty allows any.",
            _networks,
        ),
    )
    tls_certificate: Path | None = field(
        default=None,
        metadata=field_doc("PEM certificate (chain): set it and tls_private_key for DICOM TLS."),
    )
    tls_private_key: Path | None = field(
        default=None, metadata=field_doc("PEM private key of tls_certificate.")
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=field_doc(
            "PEM CA certificates; when set, peers must present a certificate they signed."
        ),
    )


@dataclass(frozen=True)
class DatabaseSettings:
    """The SQL database that records instances, jobs and deliveries."""

    url: str = field(
        default=DEFAULT_DATABASE_URL,
        metadata=field_doc(
            "SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://...", _database_url
        ),
    )


@dataclass(frozen=True)
class StorageSettings:
    """The spool where received instances and our results are kept."""

    path: Path = field(default=Path("var/spool"), metadata=field_doc("Spool directory."))
    min_free_mb: int = field(
        default=1024,
        metadata=field_doc(
            "Refuse instances (status 0xA700) while the spool's disk has less free space "
            "than this, in MiB; 0 disables the check.",
            _non_negative,
        ),
    )
    max_instance_mb: int = field(
        default=4096,
        metadata=field_doc(
            "Refuse larger instances (status 0xA701), in MiB; 0 means no limit.", _non_negative
        ),
    )


@dataclass(frozen=True)
class CompletionSettings:
    """When a series counts as complete."""

    quiet_seconds: float = field(
        default=30.0,
        metadata=field_doc(
            "A series is complete this long after its last instance.", _non_negative
        ),
    )
    sweep_seconds: float = field(
        default=2.0, metadata=field_doc("How often the completion sweep runs.", positive)
    )
    counted_quiet_seconds: float = field(
        default=3.0,
        metadata=field_doc(
            "When every instance of a series gives the same Images in Acquisition and that "
            "many have arrived, the series is complete after this quiet period instead.",
            _non_negative,
        ),
    )
    modality_quiet_seconds: dict[str, Any] = field(
        default_factory=dict,
        metadata=field_doc(
            "Quiet period per Modality, e.g. { MR = 90, CR = 5 }; others use quiet_seconds.",
            _seconds_by_modality,
        ),
    )

    study_quiet_seconds: float = field(
        default=60.0,
        metadata=field_doc(
            'For routes with scope = "study": a study is complete once every series of '
            "it is complete and nothing of it arrived for this long (study routes' own "
            "quiet_seconds, when set, apply instead: the longest of them).",
            _non_negative,
        ),
    )

    def quiet_for(self, modality: str | None) -> float:
        """Return the quiet period for a series of ``modality``."""
        return float(self.modality_quiet_seconds.get(modality or "", self.quiet_seconds))


@dataclass(frozen=True)
class WorkerSettings:
    """Workers that claim jobs from the job table."""

    count: int = field(default=1, metadata=field_doc("Worker threads in `serve`.", positive))
    poll_seconds: float = field(
        default=1.0, metadata=field_doc("Idle wait between claims.", positive)
    )
    lease_seconds: float = field(
        default=300.0,
        metadata=field_doc("A claimed job is re-queued if its lease lapses.", positive),
    )
    max_attempts: int = field(
        default=5, metadata=field_doc("Attempts before a job fails for good.", positive)
    )
    retry_base_seconds: float = field(
        default=10.0, metadata=field_doc("First retry delay; it doubles per attempt.", positive)
    )
    device: str = field(
        default="auto", metadata=field_doc("auto, cpu or cuda.", one_of("auto", "cpu", "cuda"))
    )
    threads: int = field(
        default=0, metadata=field_doc("CPU threads for inference; 0 uses all cores.", _non_negative)
    )
    backend: str = field(
        default="auto",
        metadata=field_doc(
            "auto (OpenVINO on the CPU when installed; autocast on a GPU; either checked "
            "against plain PyTorch on the first batch), torch or openvino.",
            one_of("auto", "torch", "openvino"),
        ),
    )
    precision: str = field(
        default="auto",
        metadata=field_doc(
            "auto (bf16 where the CPU or GPU has it; on a CPU without, a model package's "
            "INT8 OpenVINO weights where it ships them, else fp32; fp16 on a GPU without "
            "bf16), fp32, bf16, fp16 (GPU only; bf16 on the CPU), or int8 (CPU: the "
            "package's INT8 weights where it ships them, else fp32; auto on a GPU).",
            one_of("auto", "fp32", "bf16", "fp16", "int8"),
        ),
    )
    starvation_seconds: float = field(
        default=600.0,
        metadata=field_doc(
            "A normal job queued this long is claimed as if urgent, so a stream of urgent "
            "work cannot hold it back for ever.",
            positive,
        ),
    )
    reap_seconds: float = field(
        default=15.0,
        metadata=field_doc(
            "How often expired leases are looked for; a crashed worker's job is re-queued "
            "at most lease_seconds + reap_seconds after its last heartbeat.",
            positive,
        ),
    )
    models: list[str] = field(
        default_factory=list,
        metadata=field_doc(
            "Models this process runs (e.g. only the GPU models on a GPU host); "
            "empty runs every model.",
            _model_names,
        ),
    )
    model_concurrency: dict[str, int] = field(
        default_factory=dict,
        metadata=field_doc(
            "Most jobs of one model running at once in this process, e.g. "
            "{ lung-unet2d = 1 } for one GPU job at a time; unlisted models are "
            "limited only by count.",
            _model_limits,
        ),
    )
    delivery_retry_hours: float = field(
        default=24.0,
        metadata=field_doc(
            "How long results keep being re-sent to a destination that is down before "
            "the job fails; delivery retries do not use up max_attempts.",
            positive,
        ),
    )
    delivery_retry_max_seconds: float = field(
        default=600.0,
        metadata=field_doc("Longest wait between two delivery attempts.", positive),
    )


@dataclass(frozen=True)
class ModelSettings:
    """Where model packages are found."""

    path: Path | None = field(
        default=None,
        metadata=field_doc(
            "Folder of model packages; unset means the models shipped with dicomnode."
        ),
    )


@dataclass(frozen=True)
class OutputSettings:
    """The DICOM objects we create."""

    uid_root: str = field(
        default="",
        metadata=field_doc("UID prefix for our objects; empty uses pydicom's prefix.", _uid_root),
    )
    validate: str = field(
        default="auto",
        metadata=field_doc(
            "Our own checks always, plus dciodvfy: auto (when installed), dciodvfy "
            "(required) or off (no checks at all).",
            one_of("auto", "dciodvfy", "off"),
        ),
    )
    series_number: int = field(
        default=9900,
        metadata=field_doc(
            "Series Numbers of results start here; each route's each model, in configuration "
            "order, takes the next 10: SEG +1, SR +2, overlay +3, rejection notes +9.",
            positive,
        ),
    )


@dataclass(frozen=True)
class LoggingSettings:
    """Log output."""

    level: str = field(
        default="INFO",
        metadata=field_doc(
            "DEBUG, INFO, WARNING or ERROR.", one_of("DEBUG", "INFO", "WARNING", "ERROR")
        ),
    )
    format: str = field(
        default="text",
        metadata=field_doc(
            "text: one line per event, `key=value` fields; json: one JSON object per line "
            "(time, level, logger, message and the fields), for a log collector.",
            one_of("text", "json"),
        ),
    )


@dataclass(frozen=True)
class RetentionSettings:
    """When received instances and our results are deleted from the spool.

    Only series that are complete and whose jobs have all ended are ever deleted; a
    series with a job queued, running or sending, or with a delivery still pending,
    is never touched, by the schedule or by the emergency cleanup.
    """

    enabled: bool = field(
        default=True,
        metadata=field_doc(
            "Delete on the schedule below; off keeps everything (then watch the disk)."
        ),
    )
    done_days: float = field(
        default=7.0,
        metadata=field_doc(
            "Delete a series' instances and results this many days after its last job "
            "ended done or cancelled (or after it completed, when no route matched it).",
            positive,
        ),
    )
    failed_days: float = field(
        default=30.0,
        metadata=field_doc(
            "Keep a series with a failed job or delivery this many days after it ended, so "
            "that it can be retried; then delete it.",
            positive,
        ),
    )
    emergency: bool = field(
        default=True,
        metadata=field_doc(
            "When the spool's disk runs low (below emergency_free_mb), delete the oldest "
            "series whose jobs are done and delivered ahead of schedule until it is not; "
            "never a failed, unprocessed or undelivered one."
        ),
    )
    emergency_free_mb: int = field(
        default=0,
        metadata=field_doc(
            "Free space (MiB) below which the emergency cleanup runs; must be above "
            "storage.min_free_mb, where the listener starts refusing images; 0 means twice "
            "storage.min_free_mb.",
            _non_negative,
        ),
    )

    def emergency_free_bytes(self, storage: StorageSettings) -> int:
        """Return the free space below which the emergency cleanup runs (0: never).

        Parameters
        ----------
        storage : StorageSettings
            For ``min_free_mb``, which the default threshold is twice.

        Returns
        -------
        int
            Bytes.
        """
        if not self.emergency:
            return 0
        return (self.emergency_free_mb or 2 * storage.min_free_mb) * 2**20

    sweep_minutes: float = field(
        default=10.0,
        metadata=field_doc("How often the listener's process looks for what to delete.", positive),
    )


@dataclass(frozen=True)
class MetricsSettings:
    """The optional Prometheus endpoint (``pip install 'dicomnode[metrics]'``)."""

    enabled: bool = field(
        default=False,
        metadata=field_doc("Serve /metrics and /healthz over HTTP from this process."),
    )
    host: str = field(
        default="127.0.0.1",
        metadata=field_doc("Address the endpoint listens on; 0.0.0.0 for a remote Prometheus."),
    )
    port: int = field(default=9464, metadata=field_doc("TCP port of the endpoint.", _port))


@dataclass(frozen=True)
class Destination:
    """A DICOM node our results are sent to with C-STORE."""

    name: str = field(metadata=field_doc("Name used by routes and the CLI.", _name))
    ae_title: str = field(metadata=field_doc("Its AE title.", _ae_title))
    host: str = field(metadata=field_doc("Its host name or address."))
    port: int = field(metadata=field_doc("Its port.", _port))
    timeout_seconds: float = field(
        default=30.0, metadata=field_doc("Network timeout for each association.", positive)
    )
    tls_ca: Path | None = field(
        default=None,
        metadata=field_doc(
            "PEM CA bundle that signed the destination's certificate: set it to send over "
            "DICOM TLS (TLS 1.2+), verifying the peer."
        ),
    )
    tls_certificate: Path | None = field(
        default=None,
        metadata=field_doc("PEM client certificate (chain) to present, for a PACS that asks."),
    )
    tls_private_key: Path | None = field(
        default=None, metadata=field_doc("PEM private key of tls_certificate.")
    )
    tls_server_name: str | None = field(
        default=None,
        metadata=field_doc(
            "Name its certificate must carry (hostname check); defaults to host.", _server_name
        ),
    )
    storage_commitment: bool = field(
        default=False,
        metadata=field_doc(
            "After sending, ask it to commit to keeping the objects (Storage Commitment "
            "Push Model); the delivery is 'confirmed' when its report arrives, re-sent when "
            "it reports failures or stays silent."
        ),
    )
    commitment_timeout_seconds: float = field(
        default=3600.0,
        metadata=field_doc(
            "How long to wait for the commitment report before the objects are re-sent.",
            positive,
        ),
    )

    @property
    def address(self) -> str:
        """Return ``AE_TITLE@host:port``, as logs, audit rows and the CLI name it."""
        return f"{self.ae_title}@{self.host}:{self.port}"


SEG_COMPRESSIONS = ("none", "jpeg2000", "jpeg-ls", "rle")


@dataclass(frozen=True)
class SegOptions:
    """How a route's DICOM SEG is encoded, for the viewers and PACS it goes to."""

    type: str = field(
        default="binary",
        metadata=field_doc(
            "binary (one bit per pixel and frame per segment; what every SEG viewer reads) "
            "or labelmap (one frame per slice, a segment number per pixel; Label Map "
            "Segmentation Storage, which older viewers and validators do not know).",
            one_of("binary", "labelmap"),
        ),
    )
    compression: str = field(
        default="none",
        metadata=field_doc(
            "Lossless compression of the frames: none, jpeg2000, or, for labelmap only, "
            "jpeg-ls and rle.",
            one_of(*SEG_COMPRESSIONS),
        ),
    )
    empty_frames: bool = field(
        default=False,
        metadata=field_doc(
            "Keep a frame for every source image and segment even where it is empty, for "
            "viewers that need one frame per source image."
        ),
    )


@dataclass(frozen=True)
class ContentCheck:
    """What a series must show before a route's models run on it.

    Header rules (``match``) cannot tell a usable series from a scout or a partial
    one; these look at the images and at another model's verdict.
    """

    min_slices: int = field(
        default=0, metadata=field_doc("Fewest slices the series must have.", _non_negative)
    )
    axial: bool = field(
        default=False,
        metadata=field_doc("Slices must be axial (normal within 10 degrees of head-foot)."),
    )
    model: str = field(
        default="",
        metadata=field_doc(
            "A model that must have run on the same series first (from any route), "
            "e.g. the lung U-Net; its job is waited for."
        ),
    )
    min_volume_ml: float = field(
        default=0.0,
        metadata=field_doc(
            "Least total segment volume that model must have found, e.g. a non-empty lung mask.",
            _non_negative,
        ),
    )


@dataclass(frozen=True)
class SeriesSelection:
    """How a study-scope route picks its one input series among the study's series.

    Every series of the study that the route's ``match`` accepts and that is a volume
    (not a localizer, dose report or capture) is a candidate. The required checks
    drop candidates; the rest are ranked, and the best one is the job's input.
    """

    axial: bool = field(
        default=False,
        metadata=field_doc("Required: axial slices (normal within 10 degrees of head-foot)."),
    )
    max_slice_thickness: float = field(
        default=0.0,
        metadata=field_doc(
            "Required: Slice Thickness at most this many mm (0: any); a series that "
            "gives none is judged by the spacing of its slices.",
            _non_negative,
        ),
    )
    min_slices: int = field(
        default=0, metadata=field_doc("Required: at least this many slices.", _non_negative)
    )
    distinct_positions: bool = field(
        default=False,
        metadata=field_doc(
            "Required: no two slices at the same position (refuses multi-phase series "
            "that repeat positions); reads every instance's header."
        ),
    )
    prefer: dict[str, Any] = field(
        default_factory=dict,
        metadata=field_doc(
            "Preferences in order, as match rules, e.g. { ConvolutionKernel = "
            '"re:(?i)lung|B6|B7" }: a series meeting the first ranks above every '
            "series that does not, and so on; then most slices, thinnest slices, lowest "
            "Series Number.",
            _match_rules,
        ),
    )


@dataclass(frozen=True)
class PriorSettings:
    """Where a route finds the patient's earlier study, to compare with.

    The node looks in its own database first; then it asks ``destination`` (C-FIND at
    study then series level, by Patient ID, excluding the current study) and
    retrieves the prior series by C-MOVE to its own AE title, or by C-GET. Retrieved series are
    stored like received ones, marked as priors: they run no routes of their own.
    """

    destination: str = field(
        default="",
        metadata=field_doc(
            "The destination (PACS) to query and retrieve from; empty: no priors.", _name_or_empty
        ),
    )
    max: int = field(
        default=1, metadata=field_doc("How many prior studies, newest first.", positive)
    )
    within_days: float = field(
        default=1500.0,
        metadata=field_doc("Only studies at most this many days older than the current.", positive),
    )
    match: dict[str, Any] = field(
        default_factory=dict,
        metadata=field_doc(
            'Match rules a prior series must meet, e.g. { Modality = "CT" } (Modality is '
            "also asked of the PACS); then the route's select picks among them.",
            _match_rules,
        ),
    )
    wait_seconds: float = field(
        default=300.0,
        metadata=field_doc(
            "How long a PACS that is down or does not answer may delay the job; then it "
            "runs without priors and says why.",
            _non_negative,
        ),
    )
    retrieve: str = field(
        default="move",
        metadata=field_doc(
            "move: C-MOVE to the listener's AE title (the PACS must know its AE title, host "
            "and port); get: C-GET, the images come back on the node's own association "
            "(nothing to configure on the PACS, which must support C-GET).",
            one_of("move", "get"),
        ),
    )


@dataclass(frozen=True)
class Route:
    """Which models run on which series, and where the results go."""

    name: str = field(metadata=field_doc("Route name.", _name))
    match: dict[str, Any] = field(
        default_factory=dict,
        metadata=field_doc(
            "DICOM keyword -> exact value, 're:' + regular expression, or a list of either.",
            _match_rules,
        ),
    )
    models: list[str] = field(default_factory=list, metadata=field_doc("Model packages to run."))
    send_to: list[str] = field(default_factory=list, metadata=field_doc("Destination names."))
    scope: str = field(
        default="series",
        metadata=field_doc(
            "series: one job per matching series, once it is complete. study: one job per "
            "study, once the whole study is complete, on the series `select` picks among "
            "the matching ones; a late series re-opens the study.",
            one_of("series", "study"),
        ),
    )
    select: SeriesSelection = field(
        default_factory=SeriesSelection,
        metadata=field_doc(
            'For scope = "study": which series is the input (required checks, then '
            "preferences); the choice and why are shown by `jobs show`."
        ),
    )
    priors: PriorSettings = field(
        default_factory=PriorSettings,
        metadata=field_doc(
            "The patient's earlier study to compare with: from the node's own database, "
            "else queried and retrieved from a PACS; `jobs show` says which, or why none."
        ),
    )
    quiet_seconds: float | None = field(
        default=None,
        metadata=field_doc(
            'Quiet period for the series this route matches (for scope = "study": for '
            "the study), instead of the modality's or the default; when several routes "
            "match, the longest applies.",
            _non_negative,
        ),
    )
    priority: str = field(
        default="normal",
        metadata=field_doc(
            "urgent jobs are claimed before normal ones (e.g. a stroke or trauma route).",
            one_of("normal", "urgent"),
        ),
    )
    requires: ContentCheck = field(
        default_factory=ContentCheck,
        metadata=field_doc(
            "Content checks before the models run; a series that fails them gets its "
            "jobs cancelled with the reason."
        ),
    )
    seg: SegOptions = field(
        default_factory=SegOptions,
        metadata=field_doc("How this route's SEG is encoded: type, compression, empty frames."),
    )
    overlay: bool = field(
        default=False,
        metadata=field_doc(
            "Also send an RGB Secondary Capture series of the slices with segments, "
            "outlines and legend burned in, for viewers that cannot show SEG."
        ),
    )


@dataclass(frozen=True)
class Settings:
    """Every setting of a node."""

    listener: ListenerSettings = field(default_factory=ListenerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    destinations: list[Destination] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    source: Path | None = field(default=None, metadata={"internal": True})

    def destination(self, name: str) -> Destination:
        """Return the destination called ``name``.

        Raises
        ------
        ConfigError
            If no destination has that name.
        """
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"unknown destination {name!r} (known: {known})")


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}  # fmt: skip


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Turn ``DICOMNODE_SECTION_KEY=value`` variables into a TOML-like mapping."""
    top = typing.get_type_hints(Settings)
    sections = {name: tp for name, tp in top.items() if dataclasses.is_dataclass(tp)}
    out: dict[str, dict[str, Any]] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"{var}: unknown setting (no such section)")
        key = rest[len(section) + 1 :]
        hints = typing.get_type_hints(sections[section])
        if key not in hints:
            raise ConfigError(f"{var}: unknown setting {section}.{key}")
        tp = hints[key]
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        # Numbers and yes/no are parsed here; everything else stays a string and is
        # checked by build() like any value from the file.
        value: Any = raw
        try:
            if tp is bool:
                value = _BOOLEANS[raw.strip().lower()]
            elif tp in (int, float):
                value = tp(raw)
            elif typing.get_origin(tp) is list:  # comma-separated, e.g. "CT1,CT2"
                value = [item.strip() for item in raw.split(",") if item.strip()]
        except (ValueError, KeyError):
            raise ConfigError(f"{var}: must be {type_name(tp)}, got {raw!r}") from None
        out.setdefault(section, {})[key] = value
    return out


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    """Make relative paths absolute against ``base`` (the config file's folder)."""

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    url = settings.database.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rel = url[len("sqlite:///") :]
        if rel and rel != ":memory:":
            url = "sqlite:///" + str(absolute(Path(rel)))
    models_path = settings.models.path
    listener = settings.listener
    tls: dict[str, Any] = {
        key: absolute(value)
        for key in ("tls_certificate", "tls_private_key", "tls_client_ca")
        if (value := getattr(listener, key)) is not None
    }
    destinations: list[Destination] = []
    for dest in settings.destinations:
        files: dict[str, Any] = {
            key: absolute(value)
            for key in DESTINATION_TLS_FILES
            if (value := getattr(dest, key)) is not None
        }
        destinations.append(dataclasses.replace(dest, **files))
    return dataclasses.replace(
        settings,
        destinations=destinations,
        listener=dataclasses.replace(listener, **tls),
        database=DatabaseSettings(url=url),
        storage=dataclasses.replace(settings.storage, path=absolute(settings.storage.path)),
        models=ModelSettings(path=absolute(models_path) if models_path is not None else None),
    )


DESTINATION_TLS_FILES = ("tls_ca", "tls_certificate", "tls_private_key")


def _check_destination_files(settings: Settings) -> None:
    """Check that the destinations' TLS files exist (after paths are resolved).

    A missing CA bundle would otherwise surface only as a failed delivery hours later.
    """
    for i, dest in enumerate(settings.destinations):
        for key in DESTINATION_TLS_FILES:
            path = getattr(dest, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"destinations[{i}].{key}: file not found: {path}")


def _check_models_path(settings: Settings) -> None:
    """Check that ``models.path``, when set, is a folder (after paths are resolved).

    Every other missing file names its key; without this check a typo here surfaced
    as "PATH: models folder not found" from the model registry, naming no key.
    """
    path = settings.models.path
    if path is not None and not path.is_dir():
        what = "not a folder" if path.exists() else "folder not found"
        raise ConfigError(f"models.path: {what}: {path}")


def _cross_check(settings: Settings) -> None:
    """Check what spans keys and sections: TLS files in pairs, unique names, routes."""
    listener = settings.listener
    if (listener.tls_certificate is None) != (listener.tls_private_key is None):
        raise ConfigError(
            "listener.tls_certificate: set both tls_certificate and tls_private_key, or neither"
        )
    if listener.tls_client_ca is not None and listener.tls_certificate is None:
        raise ConfigError("listener.tls_client_ca: needs tls_certificate and tls_private_key")
    names = [d.name for d in settings.destinations]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"destinations[{i}].name: duplicate destination {name!r}")
    for i, peer in enumerate(settings.destinations):
        if (peer.tls_certificate is None) != (peer.tls_private_key is None):
            raise ConfigError(
                f"destinations[{i}].tls_certificate: set both tls_certificate and "
                "tls_private_key, or neither"
            )
        tls_set = peer.tls_certificate is not None or peer.tls_server_name is not None
        if tls_set and peer.tls_ca is None:
            # Without a CA there is nothing to verify the PACS against, and a TLS
            # connection that trusts anyone is not worth the name.
            key = "tls_certificate" if peer.tls_certificate is not None else "tls_server_name"
            raise ConfigError(f"destinations[{i}].{key}: needs tls_ca (the PACS's CA bundle)")
    retention, storage = settings.retention, settings.storage
    if (
        retention.emergency
        and retention.emergency_free_mb
        and retention.emergency_free_mb <= storage.min_free_mb
    ):
        # Below min_free_mb the listener refuses images; the cleanup must start before.
        raise ConfigError(
            f"retention.emergency_free_mb: {retention.emergency_free_mb} must be above "
            f"storage.min_free_mb ({storage.min_free_mb}), or 0 for twice that"
        )
    if retention.failed_days < retention.done_days:
        raise ConfigError(
            f"retention.failed_days: {retention.failed_days:g} is shorter than done_days "
            f"({retention.done_days:g}); failed series are kept at least as long"
        )
    if settings.metrics.enabled and importlib.util.find_spec("prometheus_client") is None:
        # Checked here, not when the endpoint starts, so `config check` says so too.
        raise ConfigError(
            "metrics.enabled: needs prometheus-client; pip install 'dicomnode[metrics]'"
        )
    route_names = [r.name for r in settings.routes]
    for i, route in enumerate(settings.routes):
        if route.name in route_names[:i]:
            raise ConfigError(f"routes[{i}].name: duplicate route {route.name!r}")
        if not route.models:
            raise ConfigError(f"routes[{i}].models: a route needs at least one model")
        if route.requires.model in route.models:
            raise ConfigError(
                f"routes[{i}].requires.model: {route.requires.model!r} is run by this route "
                "itself; name a model another route runs first"
            )
        if route.scope == "series" and route.select != SeriesSelection():
            raise ConfigError(f'routes[{i}].select: needs scope = "study"')
        if route.requires.min_volume_ml and not route.requires.model:
            raise ConfigError(f"routes[{i}].requires.min_volume_ml: needs requires.model")
        if route.seg.type == "binary" and route.seg.compression in ("jpeg-ls", "rle"):
            # highdicom packs binary frames 8 pixels a byte; only JPEG 2000 takes them.
            raise ConfigError(
                f"routes[{i}].seg.compression: {route.seg.compression} needs seg.type = "
                "labelmap; binary SEGs take none or jpeg2000"
            )
        if route.priors.destination and route.priors.destination not in names:
            raise ConfigError(
                f"routes[{i}].priors.destination: unknown destination {route.priors.destination!r} "
                f"(known: {', '.join(names) or 'none configured'})"
            )
        for dest in route.send_to:
            if dest not in names:
                raise ConfigError(
                    f"routes[{i}].send_to: unknown destination {dest!r} "
                    f"(known: {', '.join(names) or 'none configured'})"
                )


def parse_settings(
    data: Mapping[str, Any],
    *,
    base: Path | None = None,
    environ: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Settings:
    """Validate a TOML-shaped mapping and return the settings.

    Parameters
    ----------
    data : Mapping[str, Any]
        The parsed TOML document.
    base : Path, optional
        Folder that relative paths are resolved against; the current directory if omitted.
    environ : Mapping[str, str], optional
        Environment whose ``DICOMNODE_*`` variables override the file; none if omitted.
    source : Path, optional
        The file the data came from, remembered for messages.

    Returns
    -------
    Settings
        The validated, frozen settings.

    Raises
    ------
    ConfigError
        If a key is unknown or a value is bad; the message names the key.
    """
    merged: dict[str, Any] = {
        k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()
    }
    for section, values in _env_overrides(environ or {}).items():
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a table, got {type(target).__name__}")
        target.update(values)
    settings: Settings = build(Settings, merged)
    _cross_check(settings)
    settings = _resolve_paths(settings, base or Path.cwd())
    _check_destination_files(settings)
    _check_models_path(settings)
    return dataclasses.replace(settings, source=source)


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from ``path``, ``$DICOMNODE_CONFIG`` or the built-in defaults.

    Parameters
    ----------
    path : path-like, optional
        The TOML file; when omitted ``$DICOMNODE_CONFIG`` is used, and when that is
        unset the defaults apply (relative paths against the current directory).
    environ : Mapping[str, str], optional
        Environment to read; ``os.environ`` if omitted.

    Returns
    -------
    Settings
        The validated settings.

    Raises
    ------
    ConfigError
        If the file cannot be read or parsed, or a setting is bad.
    """
    env = os.environ if environ is None else environ
    chosen = path if path is not None else env.get(ENV_CONFIG)
    if chosen is None:
        return parse_settings({}, environ=env)
    file = Path(chosen)
    try:
        with file.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{file}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read configuration file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_settings(data, base=file.resolve().parent, environ=env, source=file)


def documented_keys() -> dict[str, str]:
    """Return ``section.key -> description`` for every setting.

    Returns
    -------
    dict[str, str]
        Used by the tests to check that ``config.example.toml`` documents every key.
    """
    out: dict[str, str] = {}
    hints = typing.get_type_hints(Settings)
    for top in dataclasses.fields(Settings):
        if top.metadata.get("internal"):
            continue
        tp = hints[top.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        for f in dataclasses.fields(inner):
            out[f"{top.name}.{f.name}"] = f.metadata.get("doc", "")
    return out
