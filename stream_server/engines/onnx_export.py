"""SenseVoice to ONNX, once per model: funasr's own exporter in a child process, cached, under a lock.

The ONNX Runtime backend (:mod:`.sensevoice_onnx`) needs ``model.onnx`` (fp32) and ``model_quant.onnx``
(dynamically quantized MatMuls, int8). A SenseVoice folder as the hubs ship it holds ``model.pt`` only,
so on first use this module runs funasr's exporter::

    AutoModel(model=FOLDER, disable_update=True, device="cpu").export(
        type="onnx", quantize=True, output_dir=OUT
    )

- **In a child process** (``python -m stream_server.engines.onnx_export FOLDER OUT``): exporting the
  full model peaks at several GB and prints thousands of log lines; the server process keeps neither.
  The child's output goes to ``export.log`` in the export folder.
- **Cached** under ``<cache root>/<folder name>-<key>/``, where the key is a SHA-256 over the files that
  define the model (``config.yaml``, ``am.mvn``, ``model.pt``), so an edited or replaced model is
  exported again and two folders never share an export by name alone. ``manifest.json`` records the
  source and the versions that made it.
- **Locked**: an exclusive ``flock`` on ``<key dir>.lock`` while exporting. A second process (another
  replica starting on the same volume) waits on the lock and then finds the export done; it never
  exports at the same time. The export is written into a temporary folder and renamed into place, so a
  crash leaves no half export that looks complete.

Exporting the full model took 169 s on 2 CPU cores (``/work/shared/MODELS.md``); the small test model
about 30 s.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import EngineError

logger = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
INT8_FILE = "model_quant.onnx"
MANIFEST_FILE = "manifest.json"
LOG_FILE = "export.log"
SOURCE_FILES = ("config.yaml", "am.mvn", "model.pt")
"""The files whose contents decide the export (hashed into its folder name)."""

EXPORT_TIMEOUT_S = 3600.0
"""An export that takes longer is killed (the full model took 169 s on 2 cores)."""


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/stream-server/onnx``, or ``~/.cache/stream-server/onnx``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stream-server" / "onnx"


def source_key(folder: Path) -> str:
    """A short SHA-256 over the model-defining files of ``folder`` (names and contents).

    Raises:
        EngineError: ``model.pt`` or ``config.yaml`` is missing.
    """
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        path = folder / name
        if not path.is_file():
            if name == "am.mvn":
                continue
            raise EngineError(f"{folder} has no {name}: it is not a SenseVoice folder that can be exported")
        digest.update(name.encode() + b"\0")
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def export_dir_for(folder: Path, cache_root: Path) -> Path:
    """Where the export of ``folder`` lives (whether or not it exists yet)."""
    return cache_root / f"{folder.resolve().name}-{source_key(folder)}"


def is_complete(export_dir: Path) -> bool:
    """The folder holds a finished export (both ONNX files and the manifest)."""
    return all((export_dir / name).is_file() for name in (FP32_FILE, INT8_FILE, MANIFEST_FILE))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock_path``; logs while it waits for another holder."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another process is exporting this model to ONNX (%s); waiting for it", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_export(folder: Path, cache_root: Path, *, timeout_s: float = EXPORT_TIMEOUT_S) -> Path:
    """The cached ONNX export of ``folder``, exporting it first when there is none.

    Args:
        folder: a SenseVoice folder with ``config.yaml`` and ``model.pt``.
        cache_root: the directory holding exports.
        timeout_s: how long the export may take.

    Returns:
        The export folder, holding ``model.onnx``, ``model_quant.onnx`` and ``manifest.json``.

    Raises:
        EngineError: the folder cannot be exported (files missing, the exporter's packages missing,
            the export failed or timed out), with the tail of the exporter's log.
    """
    target = export_dir_for(folder, cache_root)
    if is_complete(target):
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if is_complete(target):  # another process finished it while this one waited
            logger.info("ONNX export of %s appeared in %s while waiting", folder, target)
            return target
        _check_exporter_packages()
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
        try:
            _run_export(folder, tmp, timeout_s)
            if target.exists():  # an incomplete leftover (no manifest): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _check_exporter_packages() -> None:
    missing = [name for name in ("onnx", "onnxscript") if _find_spec(name) is None]
    if missing:
        raise EngineError(
            f"exporting SenseVoice to ONNX needs the {' and '.join(missing)} package(s): "
            f"pip install {' '.join(missing)} (or use --backend torch)"
        )


def _find_spec(name: str) -> object | None:
    import importlib.util

    return importlib.util.find_spec(name)


def _run_export(folder: Path, out: Path, timeout_s: float) -> None:
    log_path = out / LOG_FILE
    started = time.monotonic()
    logger.warning(
        "EXPORTING SenseVoice %s to ONNX for the ONNX Runtime backend (first start only; about 3 minutes "
        "on 2 CPU cores for SenseVoice Small); log: %s",
        folder,
        log_path,
    )
    argv = [sys.executable, "-m", "stream_server.engines.onnx_export", str(folder), str(out)]
    with log_path.open("wb") as log:
        try:
            completed = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise EngineError(
                f"the ONNX export of {folder} took over {timeout_s:.0f} s and was stopped; "
                f"its log: {_tail(log_path)}"
            ) from exc
    missing = [name for name in (FP32_FILE, INT8_FILE) if not (out / name).is_file()]
    if completed.returncode != 0 or missing:
        raise EngineError(
            f"the ONNX export of {folder} failed (exit {completed.returncode}"
            f"{', no ' + ' or '.join(missing) if missing else ''}); its log ends with:\n{_tail(log_path)}"
        )
    manifest = {
        "source": str(folder.resolve()),
        "source_key": source_key(folder),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export_seconds": round(time.monotonic() - started, 1),
        "versions": _versions(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.warning("ONNX export of %s done in %.0f s", folder, time.monotonic() - started)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in ("funasr", "torch", "onnx", "onnxscript", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def read_manifest(export_dir: Path) -> dict[str, object]:
    """The manifest of an export folder (empty when absent or unreadable)."""
    try:
        data = json.loads((export_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _export_main(argv: Sequence[str] | None = None) -> int:
    """The child process: funasr's exporter, nothing else."""
    parser = argparse.ArgumentParser(description="Export a SenseVoice folder to ONNX with funasr (internal).")
    parser.add_argument("folder")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    import torch

    from .funasr_loading import load_automodel

    threads = max(1, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    model = load_automodel(Path(args.folder), threads=threads, device="cpu")
    model.export(type="onnx", quantize=True, output_dir=args.out, device="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(_export_main())
