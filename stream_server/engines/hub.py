"""Which model to load: resolving ``--model`` (``auto``, a hub id, a folder, ``tiny.en``) and downloading.

``auto`` prefers SenseVoice Small and falls back, loudly, to the bundled faster-whisper tiny.en:

1. SenseVoice Small already in a local model cache (ModelScope's or Hugging Face's, in every layout
   their SDKs have written, honouring ``MODELSCOPE_CACHE``, ``HF_HUB_CACHE`` and ``HF_HOME``) is loaded
   from there, without touching the network;
2. else, when the configured hub answers one quick HTTP request within ``hub_timeout_s`` (no retries),
   SenseVoice Small is downloaded from it;
3. else faster-whisper tiny.en runs, with a ``fallback_reason`` saying why.

Nothing here imports torch or funasr; the hub SDKs are imported only when a download starts.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import EngineConfig
from ..errors import ModelDownloadError

logger = logging.getLogger(__name__)

Hub = Literal["ms", "hf"]
EngineKind = Literal["sensevoice", "whisper"]

SENSEVOICE_IDS: dict[Hub, str] = {"ms": "iic/SenseVoiceSmall", "hf": "FunAudioLLM/SenseVoiceSmall"}
"""SenseVoice Small's id on each hub."""

HUB_NAMES: dict[Hub, str] = {"ms": "ModelScope", "hf": "Hugging Face"}

WHISPER_BUNDLED = "tiny.en"
"""The ``--model`` value naming the bundled faster-whisper model."""

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

HubProbe = Callable[[Hub, float], "str | None"]
"""``probe(hub, timeout_s)``: None when the hub answered in time, else a short description of the failure."""


@dataclass(frozen=True)
class ModelChoice:
    """The outcome of :func:`resolve_model`.

    Attributes:
        engine: which engine loads it: ``"sensevoice"`` or ``"whisper"``.
        model: what that engine loads: a hub id, a local folder, or ``"tiny.en"`` (bundled).
        fallback_reason: None when this is what was asked for (or what ``auto`` prefers); otherwise a
            sentence saying why the fallback runs, for logs, ``/health`` and the session metadata.
        detail: one line saying how the choice was made (for the start-up log).
        auto: True when the choice came from ``--model auto`` (a failed download may then fall back).
    """

    engine: EngineKind
    model: str
    fallback_reason: str | None = None
    detail: str = ""
    auto: bool = False


def resolve_model(config: EngineConfig, *, probe: HubProbe | None = None) -> ModelChoice:
    """Decide which engine and model ``config.model`` means.

    Rules, in order: ``tiny.en`` is the bundled faster-whisper; an existing path is a SenseVoice folder;
    ``owner/name`` is a hub id on ``config.hub``; ``auto`` is SenseVoice Small from a local cache, else
    from the hub when it answers within ``config.hub_timeout_s``, else the bundled faster-whisper with a
    ``fallback_reason``; anything else is taken as a folder (loading it says that it is missing).

    Args:
        config: the engine settings.
        probe: how to ask whether a hub answers (default :func:`http_probe`); injectable for tests.

    Returns:
        The choice. Never raises for an unreachable hub: ``auto`` falls back instead.
    """
    model = config.model.strip()
    if model == WHISPER_BUNDLED:
        return ModelChoice(
            "whisper", WHISPER_BUNDLED, detail="the bundled faster-whisper tiny.en was asked for"
        )
    if model != "auto":
        local = Path(model).expanduser()
        if local.exists():
            return ModelChoice("sensevoice", str(local), detail=f"local folder {local}")
        if is_hub_id(model):
            return ModelChoice("sensevoice", model, detail=f"hub id {model} on {HUB_NAMES[config.hub]}")
        return ModelChoice("sensevoice", str(local), detail=f"local folder {local} (missing)")

    cached = find_cached_sensevoice(config.hub)
    if cached is not None:
        return ModelChoice(
            "sensevoice",
            str(cached),
            detail=f"SenseVoice Small found in the local cache at {cached}",
            auto=True,
        )

    model_id = SENSEVOICE_IDS[config.hub]
    started_s = time.monotonic()
    error = (probe or http_probe)(config.hub, config.hub_timeout_s)
    if error is None:
        took_s = time.monotonic() - started_s
        return ModelChoice(
            "sensevoice",
            model_id,
            detail=(
                f"SenseVoice Small is not cached; {_hub_host(config.hub)} answered in {took_s:.1f} s, "
                f"downloading {model_id}"
            ),
            auto=True,
        )
    reason = (
        f"SenseVoice Small is not cached and no model hub is reachable ({_hub_host(config.hub)}: {error}); "
        "running the bundled faster-whisper tiny.en (English only)"
    )
    return ModelChoice("whisper", WHISPER_BUNDLED, fallback_reason=reason, detail=reason, auto=True)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub id (``owner/name``), as opposed to a path."""
    return bool(_HUB_ID_RE.match(name))


# -- Local caches -------------------------------------------------------------------------------------


def find_cached_sensevoice(hub: Hub = "ms") -> Path | None:
    """SenseVoice Small's folder in a local cache, the configured hub's cache first.

    Args:
        hub: the hub to look at first; the other hub's cache is looked at too.

    Returns:
        A complete model folder (``model.pt`` plus ``config.yaml`` or ``configuration.json``), or None.
    """
    order: list[Hub] = [hub, "hf" if hub == "ms" else "ms"]
    for name in order:
        model_id = SENSEVOICE_IDS[name]
        candidates = modelscope_cache_dirs(model_id) if name == "ms" else huggingface_cache_dirs(model_id)
        for folder in candidates:
            if is_complete_model_dir(folder):
                return folder
    return None


def is_complete_model_dir(folder: Path) -> bool:
    """Whether ``folder`` holds what funasr needs to load a model without downloading anything."""
    return (folder / "model.pt").is_file() and (
        (folder / "config.yaml").is_file() or (folder / "configuration.json").is_file()
    )


def modelscope_cache_root() -> Path:
    """ModelScope's cache root: ``$MODELSCOPE_CACHE`` (or ``$MS_CACHE_HOME``), else ``~/.cache/modelscope``.

    (The SDKs before modelscope 1.38 used ``~/.cache/modelscope/hub``: :func:`modelscope_cache_dirs` looks
    there too.)
    """
    env = os.environ.get("MODELSCOPE_CACHE") or os.environ.get("MS_CACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modelscope"


def modelscope_cache_dirs(model_id: str) -> list[Path]:
    """Where the ModelScope SDKs may have put ``model_id``, newest layout first.

    - ``{root}/models/{owner}--{name}/snapshots/{rev}/`` (modelscope-hub, modelscope >= 1.38);
    - ``{root}/models/{owner}/{name}/`` (older SDKs when ``MODELSCOPE_CACHE`` was set);
    - ``{root}/hub/models/{owner}/{name}/`` (older SDKs' default, ``~/.cache/modelscope/hub``);
    - ``{root}/{owner}/{name}/`` and ``{root}/hub/{owner}/{name}/`` (before the ``models/`` level).

    Dots in the name are stored as ``___`` by the SDKs; both spellings are tried.
    """
    root = modelscope_cache_root()
    owner, _, name = model_id.partition("/")
    names = [name] if "." not in name else [name.replace(".", "___"), name]
    snapshots = root / "models" / f"{owner}--{name}" / "snapshots"
    found = _snapshot_dirs(snapshots, preferred=("master", "main"))
    for base in (root / "models", root / "hub" / "models", root, root / "hub"):
        found.extend(base / owner / n for n in names)
    return found


def huggingface_cache_root() -> Path:
    """Hugging Face's hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.

    (``~/.cache`` is ``$XDG_CACHE_HOME`` when set, as in huggingface_hub.)
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def huggingface_cache_dirs(model_id: str) -> list[Path]:
    """Snapshots of ``model_id`` in the Hugging Face cache: the one ``refs/main`` names first, then others."""
    repo = huggingface_cache_root() / ("models--" + model_id.replace("/", "--"))
    preferred: tuple[str, ...] = ()
    try:
        preferred = ((repo / "refs" / "main").read_text().strip(),)
    except OSError:
        pass
    return _snapshot_dirs(repo / "snapshots", preferred=preferred)


def _snapshot_dirs(snapshots: Path, *, preferred: tuple[str, ...]) -> list[Path]:
    """Sub-folders of ``snapshots``: those named in ``preferred`` first, then newest first."""
    try:
        children = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return []
    first = [snapshots / name for name in preferred if (snapshots / name).is_dir()]
    rest = sorted((p for p in children if p not in first), key=_mtime, reverse=True)
    return first + rest


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# -- Reaching the hubs ----------------------------------------------------------------------------------


def _hub_endpoint(hub: Hub) -> str:
    """The hub's base URL, honouring the mirrors users set (``MODELSCOPE_DOMAIN``, ``HF_ENDPOINT``)."""
    if hub == "hf":
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn").rstrip("/")
    return domain if domain.startswith(("http://", "https://")) else f"https://{domain}"


def _hub_host(hub: Hub) -> str:
    host = _hub_endpoint(hub).split("://", 1)[-1].split("/", 1)[0]
    return host.removeprefix("www.")


def _probe_url(hub: Hub) -> str:
    if hub == "hf":
        return f"{_hub_endpoint(hub)}/api/models/{SENSEVOICE_IDS['hf']}"
    return f"{_hub_endpoint(hub)}/api/v1/models/{SENSEVOICE_IDS['ms']}"


def http_probe(hub: Hub, timeout_s: float) -> str | None:
    """Ask the hub's API about SenseVoice Small once, giving up after ``timeout_s`` whatever happens.

    The request runs in a daemon thread joined with a deadline, because urllib's timeout covers each
    socket operation but not DNS resolution; a hung lookup is abandoned, never waited for. No retries.

    Args:
        hub: ``"ms"`` or ``"hf"``.
        timeout_s: the hard deadline.

    Returns:
        None when the hub answered with a 2xx or 3xx status in time, else a short description of what
        went wrong (``"no answer within 5.0 s"``, ``"HTTP 404"``, the connection error).
    """
    url = _probe_url(hub)
    outcome: list[str | None] = []

    def ask() -> None:
        request = urllib.request.Request(url, method="GET", headers={"User-Agent": "stream-server"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (fixed https URL)
                response.read(1024)
                outcome.append(None if response.status < 400 else f"HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            outcome.append(f"HTTP {exc.code}")
        except urllib.error.URLError as exc:
            outcome.append(str(exc.reason))
        except Exception as exc:  # noqa: BLE001 (any failure means "not reachable")
            outcome.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=ask, name=f"hub-probe-{hub}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"no answer within {timeout_s:g} s"
    return outcome[0]


def download_model(model_id: str, hub: Hub) -> Path:
    """A local folder for ``model_id``: a complete cached copy as is, else a download through the hub SDK.

    A cached copy is used without asking the hub for a newer revision, so a server starts the same way
    online and offline. Downloads go through the same SDK calls funasr makes (``snapshot_download``).

    Args:
        model_id: ``owner/name`` on the hub.
        hub: ``"ms"`` (ModelScope) or ``"hf"`` (Hugging Face).

    Returns:
        The model folder.

    Raises:
        ModelDownloadError: the hub could not be reached or does not have the model.
    """
    cached = modelscope_cache_dirs(model_id) if hub == "ms" else huggingface_cache_dirs(model_id)
    for folder in cached:
        if is_complete_model_dir(folder):
            logger.info("using cached %s at %s", model_id, folder)
            return folder
    logger.info("downloading %s from %s", model_id, HUB_NAMES[hub])
    try:
        if hub == "hf":
            from huggingface_hub import snapshot_download as hf_snapshot_download

            folder = Path(hf_snapshot_download(model_id))
        else:
            from modelscope.hub.snapshot_download import snapshot_download as ms_snapshot_download

            folder = Path(ms_snapshot_download(model_id))
    except Exception as exc:
        raise ModelDownloadError(
            f"could not download {model_id} from {HUB_NAMES[hub]} ({_hub_host(hub)}): "
            f"{type(exc).__name__}: {exc}. Check the network (or the HF_ENDPOINT / MODELSCOPE_DOMAIN "
            f"mirror), try --hub {'ms' if hub == 'hf' else 'hf'}, or pass a local model folder with "
            "--model /path/to/SenseVoiceSmall"
        ) from exc
    if not is_complete_model_dir(folder):
        raise ModelDownloadError(
            f"{model_id} from {HUB_NAMES[hub]} was downloaded to {folder} but has no model.pt and "
            "config.yaml: is it a funasr model?"
        )
    return folder
