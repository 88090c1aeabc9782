"""One frozen settings object, built once from the environment.

Every variable selfix reads is declared in SPECS (name, default, parser, secret flag, one-line doc). The README's
settings table and the deployment checks are derived from SPECS, so a setting cannot exist without being documented.
A bad value raises SettingsError naming the variable; processes turn that into exit code EXIT_CONFIG (78, defined
with the other exit codes in selfix/process.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting has a value selfix cannot use; the message names the variable."""


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true/false")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError("must be in (0, 1]")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port 1..65535")
    return value


def _optional_str(raw: str) -> str | None:
    return raw or None


def _path(raw: str) -> Path:
    if not raw:
        raise ValueError("must not be empty")
    return Path(raw).expanduser()


def _optional_path(raw: str) -> Path | None:
    return Path(raw).expanduser() if raw else None


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if value.upper() in {a.upper() for a in allowed}:
            return next(a for a in allowed if a.upper() == value.upper())
        raise ValueError(f"must be one of {', '.join(allowed)}")

    return parse


def _name_set(raw: str) -> frozenset[str]:
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


# Nodes that read files a task cannot bring (a task brings only LoRAs and PNG/JPEG/WebP images), write outside the
# task's output prefix, or take many file names in one string. `default` in NODE_DENYLIST stands for this list; the
# README's "What a workflow may name" says why each is here.
DEFAULT_NODE_DENYLIST = frozenset({
    # ComfyUI core
    "LoadImageOutput",  # reads the output folder: other tasks' results
    "LoadLatent",  # .latent files from the input folder
    "LoadVideo", "LoadAudio", "RecordAudio",  # video/audio from the input folder
    "Load3D", "Load3DAnimation",  # 3D files from input/3d
    "LoadImageSetFromFolderNode", "LoadImageTextSetFromFolderNode",  # whole input sub-folders
    "WebcamCapture",  # LoadImage of an uploaded webcam frame
    "SaveLoRANode", "TrainLoraNode",  # write LoRAs into output/loras, which every LoRA loader lists
    # ComfyUI-Impact-Pack
    "ImageReceiver", "LatentReceiver", "ImageSender", "LatentSender",  # files passed between prompts via input/temp
    "PreviewBridge", "PreviewBridgeLatent",  # load clipspace/temp files named by a string
    "ImpactWildcardEncode",  # loads LoRAs named in prompt text (<lora:name>), matched by basename
    # efficiency-nodes-comfyui
    "XY Input: Manual XY Entry",  # many model/LoRA names in one free-text string
})


def _node_set(raw: str) -> frozenset[str]:
    """Comma-separated node class names; `default` stands for DEFAULT_NODE_DENYLIST."""
    names = _name_set(raw)
    return (names - {"default"}) | (DEFAULT_NODE_DENYLIST if "default" in names else frozenset())


def _prefix_template(raw: str) -> str:
    if "{userId}" not in raw:
        raise ValueError("must contain {userId}")
    if raw.startswith("/") or ".." in raw:
        raise ValueError("must be a relative key prefix without '..'")
    return raw if raw.endswith("/") else raw + "/"


@dataclass(frozen=True)
class Spec:
    env: str
    attr: str
    default: str
    parse: Callable[[str], Any]
    doc: str
    secret: bool = False
    group: str = "general"


# Every path default is a folder of SELFIX_HOME, so one variable moves a whole node: the container uses /app,
# ./scripts/run a checkout's var/. A default naming HOME_VAR is resolved against SELFIX_HOME in load().
HOME_VAR = "$SELFIX_HOME"
CONTAINER_HOME = "/app"

S = Spec
SPECS: tuple[Spec, ...] = (
    S("SELFIX_HOME", "selfix_home", CONTAINER_HOME, _path,
      "Root of the node's directories: every path setting below defaults to a folder in it. The container uses "
      "/app; ./scripts/run sets the checkout's var/."),
    # --- the seed's variables (names kept) ---
    S("KAFKA_BOOTSTRAP_SERVER", "kafka_bootstrap", "", _optional_str,
      "Kafka bootstrap servers (host:port,...). Empty: no Kafka; jobs come from files in inbox/.", group="kafka"),
    S("KAFKA_SECURITY_PROTOCOL", "kafka_security_protocol", "PLAINTEXT",
      _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"), "librdkafka security.protocol.", group="kafka"),
    S("KAFKA_SASL_MECHANISM", "kafka_sasl_mechanism", "PLAIN",
      _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"), "SASL mechanism when the protocol is SASL_*.", group="kafka"),
    S("KAFKA_SASL_USERNAME", "kafka_sasl_username", "", _optional_str, "SASL user name.", group="kafka"),
    S("KAFKA_SASL_PASSWORD", "kafka_sasl_password", "", _optional_str, "SASL password (never logged).",
      secret=True, group="kafka"),
    S("KAFKA_GROUP_ID", "kafka_group_id", "selfix", str, "Consumer group shared by every node of a fleet.",
      group="kafka"),
    S("KAFKA_TOPIC_INPUT", "kafka_topic_input", "selfix.tasks", str, "Topic the tasks are read from.", group="kafka"),
    S("KAFKA_TOPIC_OUTPUT", "kafka_topic_output", "selfix.results", str, "Topic the results are written to.",
      group="kafka"),
    S("S3_ENDPOINT", "s3_endpoint", "", _optional_str,
      "S3 endpoint host:port. Empty: the local directory store STORE_DIR stands in for the bucket.", group="s3"),
    S("S3_ACCESS_KEY", "s3_access_key", "", _optional_str, "S3 access key.", group="s3"),
    S("S3_SECRET_KEY", "s3_secret_key", "", _optional_str, "S3 secret key (never logged).", secret=True, group="s3"),
    S("S3_REGION", "s3_region", "us-east-1", str, "S3 region.", group="s3"),
    S("S3_BUCKET", "s3_bucket", "selfix", str, "Bucket holding LoRAs, input images and output images.", group="s3"),
    S("S3_USE_SSL", "s3_use_ssl", "false", _bool, "Use https for S3.", group="s3"),
    S("COMFY_PORT", "comfy_port", "8188", _port, "Port ComfyUI listens on (127.0.0.1 only).", group="comfyui"),
    S("COMFY_HOST", "comfy_host", "127.0.0.1", str, "Host selfix reaches ComfyUI on.", group="comfyui"),
    S("MODELS_DIR", "models_dir", "$SELFIX_HOME/models", _path,
      "Base models (checkpoints/, vae/, clip/, unet/, loras/ ...), mounted read-only.", group="comfyui"),
    S("TEMP_DIR", "temp_dir", "$SELFIX_HOME/temp", _path,
      "Scratch space: ComfyUI temp files, downloads in progress."),
    # --- selfix's own ---
    S("SPOOL_DIR", "spool_dir", "$SELFIX_HOME/spool", _path,
      "The spool (inbox/ processing/ outbox/ done/ corrupt/ tmp/)."),
    S("STORE_DIR", "store_dir", "$SELFIX_HOME/store", _path,
      "Local object store used when S3_ENDPOINT is empty (object key = relative path)."),
    S("COMFYUI_DIR", "comfyui_dir", "", _optional_path, "ComfyUI checkout (main.py) that supervisord starts.",
      group="comfyui"),
    S("COMFY_PYTHON", "comfy_python", "python3", str, "Python interpreter that runs ComfyUI's main.py.",
      group="comfyui"),
    S("COMFY_ARGS", "comfy_args", "", str, "Extra arguments for ComfyUI's main.py (e.g. --cpu, --lowvram).",
      group="comfyui"),
    S("COMFY_COMMAND", "comfy_command", "", _optional_str,
      "Whole command that starts ComfyUI; overrides COMFYUI_DIR/COMFY_ARGS (tests use it for the double).",
      group="comfyui"),
    S("COMFY_OUTPUT_DIR", "comfy_output_dir", "$SELFIX_HOME/comfy/output", _path, "ComfyUI --output-directory.",
      group="comfyui"),
    S("COMFY_INPUT_DIR", "comfy_input_dir", "$SELFIX_HOME/comfy/input", _path, "ComfyUI --input-directory.",
      group="comfyui"),
    S("COMFY_LOG_DIR", "comfy_log_dir", "$SELFIX_HOME/comfylogs", _path, "Where supervisord writes ComfyUI's log.",
      group="comfyui"),
    S("LORA_CACHE_DIR", "lora_cache_dir", "$SELFIX_HOME/loras", _path,
      "Local LoRA cache; listed by ComfyUI through the generated extra_model_paths.yaml.", group="lora"),
    S("LORA_CACHE_MAX_GB", "lora_cache_max_gb", "50", _positive_float, "LRU budget of the LoRA cache.",
      group="lora"),
    S("DISK_FREE_FLOOR_GB", "disk_free_floor_gb", "5", _non_negative_float,
      "Free disk kept on the cache/spool filesystem; /readyz fails below it.", group="lora"),
    S("LORA_HEAD_TTL_S", "lora_head_ttl_s", "60", _non_negative_float,
      "A cached LoRA checked against S3 within this many seconds is used without a request.", group="lora"),
    S("S3_VERIFY_MD5", "s3_verify_md5", "true", _bool,
      "Check the MD5 of single-part downloads against their ETag (costs CPU: about 0.6-0.9 GB/s per core).",
      group="s3"),
    S("USER_PREFIX", "user_prefix", "users/{userId}/", _prefix_template,
      "Key prefix a user's LoRAs and input images must live under.", group="lora"),
    S("JOB_TIMEOUT_S", "job_timeout_s", "600", _positive_float,
      "Deadline of one job inside ComfyUI; then interrupt and a failed `timeout` result.", group="jobs"),
    S("MAX_ATTEMPTS", "max_attempts", "3", _positive_int,
      "Attempts per task for retriable failures; then `retries_exhausted`.", group="jobs"),
    S("RETRY_BASE_S", "retry_base_s", "2", _non_negative_float, "First retry delay (doubles per attempt, jittered).",
      group="jobs"),
    S("RETRY_MAX_S", "retry_max_s", "120", _non_negative_float, "Cap of the retry delay.", group="jobs"),
    S("QUEUE_AHEAD", "queue_ahead", "1", _non_negative_int,
      "Jobs submitted to ComfyUI beyond the running one, so the GPU never waits (0 = off).", group="jobs"),
    S("WS_SILENCE_S", "ws_silence_s", "5", _positive_float,
      "After this long without a WebSocket frame the runner polls /history and /queue.", group="jobs"),
    S("DONE_RETENTION_H", "done_retention_h", "168", _positive_float,
      "done/ entries (the de-duplication ledger) older than this are pruned.", group="jobs"),
    S("RESULT_RETRY_S", "result_retry_s", "900", _positive_float,
      "How long the uploader retries storing a result's images; then it publishes a failed result instead "
      "(`storage_unavailable`, ...).", group="jobs"),
    S("UNRESOLVED_AFTER_S", "unresolved_after_s", "3600", _positive_float,
      "A task accepted longer ago than this without a published result counts in selfix_unresolved_tasks.",
      group="jobs"),
    S("CANCEL_RETENTION_H", "cancel_retention_h", "24", _positive_float,
      "Cancel requests (spool cancel/ tombstones) are kept this long, so a task that arrives later is cancelled; "
      "the consumer reads KAFKA_TOPIC_CONTROL back this far when it starts.", group="jobs"),
    S("TEMPLATES_DIR", "templates_dir", "", _optional_path,
      "Extra workflow templates (<name>.json) besides the built-in ones.", group="jobs"),
    S("MAX_MESSAGE_BYTES", "max_message_bytes", "1048576", _positive_int,
      "Largest accepted task message or job file.", group="jobs"),
    S("MAX_WORKFLOW_NODES", "max_workflow_nodes", "500", _positive_int, "Most nodes in one workflow.",
      group="jobs"),
    S("NODE_DENYLIST", "node_denylist", "default", _node_set,
      "Node classes a workflow may not use (comma-separated; `default` = the built-in list of file-reading nodes).",
      group="jobs"),
    S("NODE_ALLOWLIST", "node_allowlist", "", _node_set,
      "If set, the only node classes a workflow may use (comma-separated; for nodes that run only known templates).",
      group="jobs"),
    S("MAX_DATA_URL_BYTES", "max_data_url_bytes", "10485760", _positive_int,
      "Largest input image, from a data: URL or from the store.", group="jobs"),
    S("MAX_OUTPUT_BYTES", "max_output_bytes", "4294967296", _positive_int,
      "Largest single output file (video, image, ...); a larger one fails the task with `output_too_large`.",
      group="jobs"),
    S("MAX_TEXT_OUTPUT_BYTES", "max_text_output_bytes", "16384", _non_negative_int,
      "Text outputs (PreviewAny) are inlined in the result up to this many bytes in all; the rest become objects.",
      group="jobs"),
    S("OUTPUT_STRIP_METADATA", "output_strip_metadata", "true", _bool,
      "Drop the prompt/workflow ComfyUI embeds in still images (a task's output.stripMetadata overrides it).",
      group="jobs"),
    S("KAFKA_MAX_INFLIGHT", "kafka_max_inflight", "8", _positive_int,
      "Unfinished tasks a node holds before it pauses its partitions.", group="kafka"),
    S("KAFKA_TOPIC_DLQ", "kafka_topic_dlq", "", _optional_str,
      "Topic for messages that have no readable taskId (empty: log only).", group="kafka"),
    S("KAFKA_TOPIC_CONTROL", "kafka_topic_control", "", _optional_str,
      "Topic of cancel requests; every node reads all of its partitions (empty: off).", group="kafka"),
    S("KAFKA_SSL_CA_LOCATION", "kafka_ssl_ca_location", "", _optional_str, "CA file for SSL/SASL_SSL.",
      group="kafka"),
    S("KAFKA_STATUS_EVENTS", "kafka_status_events", "false", _bool,
      "Also publish accepted/started/progress events on the output topic.", group="kafka"),
    S("KAFKA_DRAIN_S", "kafka_drain_s", "90", _non_negative_float,
      "On SIGTERM the consumer stays in the group this long at most, until the tasks already started are published "
      "(so its last commit covers them); keep it below the consumer's stopwaitsecs.", group="kafka"),
    S("KAFKA_SESSION_TIMEOUT_MS", "kafka_session_timeout_ms", "30000", _positive_int,
      "Consumer group session timeout: a node silent this long loses its partitions to the fleet.", group="kafka"),
    S("METRICS_PORT", "metrics_port", "9400", _port, "Watchdog HTTP port: /metrics, /healthz, /readyz.",
      group="watchdog"),
    S("METRICS_HOST", "metrics_host", "0.0.0.0", str, "Address the watchdog HTTP server binds.", group="watchdog"),
    S("CONSOLE_PREVIEWS", "console_previews", "false", _bool,
      "Show the running task's ComfyUI latent previews on the console page (run ComfyUI with --preview-method). "
      "Off: they are users' pictures, and the page is for operators.", group="watchdog"),
    S("WATCHDOG_INTERVAL_S", "watchdog_interval_s", "5", _positive_float, "Watchdog tick.", group="watchdog"),
    S("GPU_SOFT_MARK", "gpu_soft_mark", "0.85", _fraction,
      "GPU memory fraction above which an idle ComfyUI is asked to /free.", group="watchdog"),
    S("GPU_HARD_MARK", "gpu_hard_mark", "0.97", _fraction,
      "GPU memory fraction above which ComfyUI is restarted between jobs.", group="watchdog"),
    S("FREE_EVERY_JOBS", "free_every_jobs", "0", _non_negative_int, "Periodic /free every N jobs (0 = off).",
      group="watchdog"),
    S("FREE_EVERY_MIN", "free_every_min", "0", _non_negative_float, "Periodic /free every M minutes (0 = off).",
      group="watchdog"),
    S("COMFY_UNRESPONSIVE_S", "comfy_unresponsive_s", "15", _positive_float,
      "ComfyUI not answering /system_stats this long (3 s probes) is killed (SIGKILL to its process group) and "
      "started again.", group="watchdog"),
    S("COMFY_RSS_LIMIT_GB", "comfy_rss_limit_gb", "0", _non_negative_float,
      "Restart ComfyUI when its RSS exceeds this (0 = off).", group="watchdog"),
    S("HEARTBEAT_STALE_S", "heartbeat_stale_s", "60", _positive_float,
      "A selfix process whose heartbeat is older is restarted.", group="watchdog"),
    S("RESTART_MIN_INTERVAL_S", "restart_min_interval_s", "120", _non_negative_float,
      "Least time between two watchdog restarts of one program.", group="watchdog"),
    S("RESTART_GRACE_S", "restart_grace_s", "30", _non_negative_float,
      "A ComfyUI restart due while a job runs (hard mark, RSS) waits this long for it, then hands it back for retry.",
      group="watchdog"),
    S("FATAL_RESTART_S", "fatal_restart_s", "10", _positive_float,
      "A program supervisord marked FATAL is started again by the watchdog after this long (doubled for each FATAL "
      "in a row, up to 32x).", group="watchdog"),
    S("SUPERVISOR_URL", "supervisor_url", "", _optional_str,
      "supervisord XML-RPC endpoint (unix:///path or http://); default: the socket selfix up configures.",
      group="watchdog"),
    S("CRASHPOINTS", "crashpoints", "", _name_set,
      "Testing only: comma-separated crash points where a process SIGKILLs itself once (see selfix/faults.py)."),
    S("LOG_FORMAT", "log_format", "text", _choice("text", "json"), "text, or json (one JSON object a line)."),
    S("LOG_LEVEL", "log_level", "INFO", _choice("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"), "Log level."),
)
del S


@dataclass(frozen=True)
class Settings:
    selfix_home: Path
    kafka_bootstrap: str | None
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str | None
    kafka_sasl_password: str | None = field(repr=False)
    kafka_group_id: str
    kafka_topic_input: str
    kafka_topic_output: str
    s3_endpoint: str | None
    s3_access_key: str | None
    s3_secret_key: str | None = field(repr=False)
    s3_region: str
    s3_bucket: str
    s3_use_ssl: bool
    comfy_port: int
    comfy_host: str
    models_dir: Path
    temp_dir: Path
    spool_dir: Path
    store_dir: Path
    comfyui_dir: Path | None
    comfy_python: str
    comfy_args: str
    comfy_command: str | None
    comfy_output_dir: Path
    comfy_input_dir: Path
    comfy_log_dir: Path
    lora_cache_dir: Path
    lora_cache_max_gb: float
    disk_free_floor_gb: float
    lora_head_ttl_s: float
    s3_verify_md5: bool
    user_prefix: str
    job_timeout_s: float
    max_attempts: int
    retry_base_s: float
    retry_max_s: float
    queue_ahead: int
    ws_silence_s: float
    done_retention_h: float
    result_retry_s: float
    unresolved_after_s: float
    cancel_retention_h: float
    templates_dir: Path | None
    max_message_bytes: int
    max_workflow_nodes: int
    node_denylist: frozenset[str]
    node_allowlist: frozenset[str]
    max_data_url_bytes: int
    max_output_bytes: int
    max_text_output_bytes: int
    output_strip_metadata: bool
    kafka_max_inflight: int
    kafka_topic_dlq: str | None
    kafka_topic_control: str | None
    kafka_ssl_ca_location: str | None
    kafka_status_events: bool
    kafka_drain_s: float
    kafka_session_timeout_ms: int
    metrics_port: int
    metrics_host: str
    console_previews: bool
    watchdog_interval_s: float
    gpu_soft_mark: float
    gpu_hard_mark: float
    free_every_jobs: int
    free_every_min: float
    comfy_unresponsive_s: float
    comfy_rss_limit_gb: float
    heartbeat_stale_s: float
    restart_min_interval_s: float
    restart_grace_s: float
    fatal_restart_s: float
    supervisor_url: str | None
    crashpoints: frozenset[str]
    log_format: str
    log_level: str

    @property
    def comfy_url(self) -> str:
        return f"http://{self.comfy_host}:{self.comfy_port}"

    @property
    def kafka_enabled(self) -> bool:
        return self.kafka_bootstrap is not None

    @property
    def s3_enabled(self) -> bool:
        return self.s3_endpoint is not None

    @property
    def run_dir(self) -> Path:
        """supervisord's socket, pid file and generated config live here, beside the spool."""
        return self.spool_dir / "run"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def supervisor_rpc_url(self) -> str:
        return self.supervisor_url or f"unix://{self.supervisor_socket}"

    def user_prefix_for(self, user_id: str) -> str:
        return self.user_prefix.replace("{userId}", user_id)

    def redacted(self) -> dict[str, str]:
        """Every setting by variable name, secrets masked: safe for logs and `selfix doctor`."""
        out: dict[str, str] = {}
        for spec in SPECS:
            value = getattr(self, spec.attr)
            shown = "" if value is None else str(value)
            out[spec.env] = "***" if spec.secret and shown else shown
        return out

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment; raise SettingsError naming every bad variable."""
    env = os.environ if environ is None else environ
    home = env.get("SELFIX_HOME", CONTAINER_HOME)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for spec in SPECS:
        raw = env.get(spec.env, default_of(spec, home))
        try:
            values[spec.attr] = spec.parse(raw)
        except ValueError as exc:
            shown = "***" if spec.secret else repr(raw)
            problems.append(f"{spec.env}={shown}: {exc}")
    if not problems:
        problems.extend(_cross_checks(values))
    if problems:
        raise SettingsError("invalid settings: " + "; ".join(problems))
    return Settings(**values)


def default_of(spec: Spec, home: str = CONTAINER_HOME) -> str:
    """The default of one setting with SELFIX_HOME = `home` (a path default is a folder of the home)."""
    return spec.default.replace(HOME_VAR + "/", home.rstrip("/") + "/")


def defaults(home: str = CONTAINER_HOME) -> dict[str, str]:
    """Every setting's default by variable name, path defaults resolved against `home`."""
    return {spec.env: default_of(spec, home) for spec in SPECS}


def implicit_home_paths(environ: Mapping[str, str]) -> list[str]:
    """The path settings that fall back to a folder of SELFIX_HOME although SELFIX_HOME itself is not set: a node
    started like this would create the container's /app tree on whatever machine it runs on."""
    if "SELFIX_HOME" in environ:
        return []
    return [spec.env for spec in SPECS if HOME_VAR in spec.default and spec.env not in environ]


def _cross_checks(v: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    if v["gpu_soft_mark"] > v["gpu_hard_mark"]:
        problems.append("GPU_SOFT_MARK must not exceed GPU_HARD_MARK")
    if v["kafka_security_protocol"].startswith("SASL_") and v["kafka_bootstrap"]:
        sasl = (("kafka_sasl_username", "KAFKA_SASL_USERNAME"), ("kafka_sasl_password", "KAFKA_SASL_PASSWORD"))
        for attr, env in sasl:
            if not v[attr]:
                problems.append(f"{env} is required when KAFKA_SECURITY_PROTOCOL={v['kafka_security_protocol']}")
    if v["s3_endpoint"]:
        for attr, env in (("s3_access_key", "S3_ACCESS_KEY"), ("s3_secret_key", "S3_SECRET_KEY")):
            if not v[attr]:
                problems.append(f"{env} is required when S3_ENDPOINT is set")
    if v["retry_base_s"] > v["retry_max_s"]:
        problems.append("RETRY_BASE_S must not exceed RETRY_MAX_S")
    return problems


def known_variables() -> frozenset[str]:
    return frozenset(spec.env for spec in SPECS)
