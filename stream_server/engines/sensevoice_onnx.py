"""SenseVoice Small on ONNX Runtime: the default backend on CPU.

Everything but the network itself is shared with the torch backend (:class:`.sensevoice.SenseVoiceCore`):
funasr's ``WavFrontend`` makes the features, batches are padded to the same length buckets, and the
CTC logits are decoded, tagged, scored and aligned by the same code. So the outputs are the torch
backend's: with the fp32 export the tokens are identical (``tests/test_engine_onnx.py`` checks it); the
int8 export (``model_quant.onnx``, dynamically quantized MatMuls, what funasr-onnx and sherpa-onnx ship
by default) differs as little as torch's own int8 does.

Where the network comes from, in order (:func:`find_onnx_model`):

1. the folder itself already holds funasr's export (``model_quant.onnx`` / ``model.onnx``, as
   ``AutoModel.export`` writes it by default, or as funasr-onnx's model folders ship);
2. else ``model.pt`` is exported once with funasr's own exporter and cached
   (:mod:`.onnx_export`: child process, keyed by a hash of the model files, under a lock).

The export takes four inputs, as funasr's ``export_meta.py`` defines them: ``speech`` (B, T, 560) LFR
features, ``speech_lengths`` (B), ``language`` and ``textnorm`` (B) embedding ids, and returns
``ctc_logits`` (B, T + 4, vocab) and ``encoder_out_lens``.

**Concurrency.** One ``InferenceSession`` holds the weights; ``InferenceSession.run`` is thread-safe,
so ``workers`` batcher threads call it at once, each run using ``threads`` intra-op threads (with one
thread a run executes in the calling thread). Weights are never copied per worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import EngineConfig, default_threads
from ..errors import ConfigError, EngineError
from . import hub, onnx_export
from .base import CallAborted, TranscribeRequest, Transcript
from .sensevoice import (
    Dtype,
    SenseVoiceCore,
    _check_buckets,
    _release_freed_memory,
    fine_length_buckets_s,
)

logger = logging.getLogger(__name__)

LANGUAGE_IDS: dict[str, int] = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13}
"""funasr ``SenseVoiceSmall.lid_dict``: the embedding row of each language query."""
TEXTNORM_IDS: dict[str, int] = {"withitn": 14, "woitn": 15}
"""funasr ``SenseVoiceSmall.textnorm_dict``: the embedding row of each text-norm query."""

DEFAULT_TOKENIZER_FILE = "chn_jpn_yue_eng_ko_spectok.bpe.model"
DEFAULT_WORKERS = 2
"""Engine workers on CPU when ``--workers 0``: chosen by measurement (see the README's Measurements).

With ``--threads 0`` each worker's session may use every core, with idle pool threads sleeping rather
than spinning: a lone call (the usual case at live pace) runs on all cores, two calls at once share
them. Measured at 8 sessions of recorded conversation on 2 cores: p95 1.23-1.28 s against 1.30-1.40 s
for two single-threaded workers, and 1.46 s for one worker of two threads."""


def find_onnx_model(folder: Path, dtype: Dtype, cache_root: Path) -> tuple[Path, str]:
    """The ONNX file to load for ``folder`` and ``dtype``, exporting ``model.pt`` when needed.

    Args:
        folder: a SenseVoice folder (``config.yaml``, ``am.mvn``, tokenizer, and ``model.pt`` and/or an
            ONNX export).
        dtype: ``int8`` (``model_quant.onnx``) or ``fp32`` (``model.onnx``).
        cache_root: where exports are cached.

    Returns:
        The file, and how it was found (for the log): ``"in the model folder"`` or ``"exported ..."``.

    Raises:
        EngineError: neither an export nor ``model.pt`` is there, or the export failed.
    """
    name = onnx_export.INT8_FILE if dtype == "int8" else onnx_export.FP32_FILE
    if (folder / name).is_file():
        return folder / name, "already in the model folder"
    if not (folder / "model.pt").is_file():
        raise EngineError(
            f"model: folder {folder} has neither {name} (an ONNX export) nor model.pt to export one from; "
            "pass a SenseVoice Small folder as downloaded from ModelScope (iic/SenseVoiceSmall) or "
            "Hugging Face (FunAudioLLM/SenseVoiceSmall)"
        )
    export_dir = onnx_export.ensure_export(folder, cache_root)
    manifest = onnx_export.read_manifest(export_dir)
    when = manifest.get("exported_at", "?")
    return export_dir / name, f"exported from model.pt on {when}, cached in {export_dir}"


class SenseVoiceOnnxEngine(SenseVoiceCore):
    """SenseVoice Small on ONNX Runtime (CPU). Use :meth:`load`; ``transcribe`` from up to ``workers``
    threads at once."""

    backend = "onnxruntime"

    def __init__(
        self,
        *,
        session: Any,
        onnx_path: Path,
        frontend: Any,
        sentencepiece: Any,
        model_name: str,
        dtype: Dtype,
        threads: int,
        workers: int,
        max_audio_s: float,
        length_buckets_s: Sequence[float],
    ) -> None:
        """Wrap a loaded ``onnxruntime.InferenceSession``; prefer :meth:`load`.

        Args:
            session: the session over the exported SenseVoice.
            onnx_path: the file it was loaded from.
            frontend: funasr's ``WavFrontend`` for this model.
            sentencepiece: the model's tokenizer.
            model_name: the hub id or folder, for ``info``.
            dtype: ``int8`` or ``fp32``.
            threads: intra-op threads of each run.
            workers: runs that may happen at once.
            max_audio_s: the longest clip accepted.
            length_buckets_s: ascending bucket lengths.
        """
        super().__init__(
            frontend=frontend,
            sentencepiece=sentencepiece,
            model_name=model_name,
            device=torch.device("cpu"),
            dtype=dtype,
            threads=threads,
            max_audio_s=max_audio_s,
            length_buckets_s=length_buckets_s,
            max_concurrent_calls=workers,
        )
        self._session = session
        self._onnx_path = onnx_path
        self._workers = workers
        self._local = threading.local()  # this thread's call: its RunOptions
        self._running: dict[int, Any] = {}  # id(first request) -> RunOptions of the call running it
        self._running_lock = threading.Lock()

    def transcribe(self, requests: Sequence[TranscribeRequest]) -> list[Transcript]:
        """Transcribe a batch (:meth:`SenseVoiceCore.transcribe`), stoppable by :meth:`abort`.

        Raises:
            CallAborted: :meth:`abort` stopped it.
        """
        import onnxruntime as ort

        if not requests:
            return []
        options = ort.RunOptions()
        key = id(requests[0])
        with self._running_lock:
            self._running[key] = options
        self._local.run_options = options
        try:
            return super().transcribe(requests)
        except Exception as exc:
            if options.terminate:
                raise CallAborted("the call was aborted") from exc
            raise
        finally:
            self._local.run_options = None
            with self._running_lock:
                self._running.pop(key, None)

    def abort(self, requests: Sequence[TranscribeRequest]) -> bool:
        """Tell the run of the call on ``requests`` to stop (ONNX Runtime checks between kernels)."""
        if not requests:
            return False
        with self._running_lock:
            options = self._running.get(id(requests[0]))
        if options is None:
            return False
        options.terminate = True
        return True

    @classmethod
    def load(
        cls,
        config: EngineConfig,
        *,
        model: str | None = None,
        max_audio_s: float = 30.0,
        length_buckets_s: Sequence[float] | None = None,
    ) -> SenseVoiceOnnxEngine:
        """Load SenseVoice Small into ONNX Runtime, exporting it first when the folder has no export.

        Args:
            config: dtype (``auto``/``int8`` or ``fp32``), threads, workers, cache directory, hub.
            model: a hub id or folder; default ``config.model`` (``auto`` must be resolved first).
            max_audio_s: the longest clip :meth:`transcribe` accepts.
            length_buckets_s: lengths batches are padded to; default every 0.5 s
                (:func:`fine_length_buckets_s`).

        Returns:
            The loaded engine (not yet warmed up).

        Raises:
            ConfigError: CUDA or fp16 asked for (this backend is CPU only), bad buckets.
            EngineError: the folder is not a SenseVoice folder, the export failed, or ONNX Runtime could
                not load the file.
        """
        import onnxruntime as ort

        name = (model if model is not None else config.model).strip()
        if name in ("auto", hub.WHISPER_BUNDLED):
            raise ConfigError(f"model: {name!r} is not a SenseVoice model; resolve it first")
        if config.device.startswith("cuda"):
            raise ConfigError(
                "backend: the ONNX Runtime backend runs on CPU only; use --backend torch for CUDA"
            )
        if config.dtype == "fp16":
            raise ConfigError("dtype: fp16 needs CUDA (--backend torch); on CPU use int8 or fp32")
        dtype: Dtype = "fp32" if config.dtype == "fp32" else "int8"
        if length_buckets_s is None:
            length_buckets_s = fine_length_buckets_s(max_audio_s)
        buckets = _check_buckets(length_buckets_s, max_audio_s)
        workers = config.workers or DEFAULT_WORKERS
        threads = config.resolved_threads  # every core per worker by default: see DEFAULT_WORKERS
        folder = _resolve_folder(name, config)
        cache_root = Path(config.onnx_cache_dir).expanduser() if config.onnx_cache_dir else None
        onnx_path, how = find_onnx_model(folder, dtype, cache_root or onnx_export.default_cache_root())

        frontend, sentencepiece = load_frontend_and_tokenizer(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if workers * threads > default_threads():
            # More threads than cores: a pool thread that spins while it waits takes a core from the other
            # worker's run, so idle pool threads sleep instead.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        started = time.monotonic()
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EngineError(
                f"ONNX Runtime could not load {onnx_path}: {type(exc).__name__}: {exc}"
            ) from exc
        _check_signature(session, onnx_path)
        _release_freed_memory()
        engine = cls(
            session=session,
            onnx_path=onnx_path,
            frontend=frontend,
            sentencepiece=sentencepiece,
            model_name=name,
            dtype=dtype,
            threads=threads,
            workers=workers,
            max_audio_s=max_audio_s,
            length_buckets_s=buckets,
        )
        logger.warning(
            "SenseVoice Small on ONNX Runtime %s (CPU, %s): %s (%s), loaded in %.1f s; "
            "%d worker(s) x %d thread(s); buckets %s s",
            ort.__version__,
            dtype,
            onnx_path,
            how,
            time.monotonic() - started,
            workers,
            threads,
            ", ".join(f"{b:g}" for b in buckets),
        )
        return engine

    @property
    def onnx_path(self) -> Path:
        """The ONNX file in use."""
        return self._onnx_path

    def _backend_extras(self) -> dict[str, str]:
        import onnxruntime as ort

        return {
            "onnxruntime": ort.__version__,
            "onnx_file": self._onnx_path.name,
            "workers": str(self._workers),
        }

    def _prepare_thread(self) -> None:
        # The torch work here (features, decoding) is small: keep it on this thread so parallel workers
        # do not contend for one intra-op pool.
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)

    def _forward(
        self, batch: torch.Tensor, lengths: Sequence[int], *, language: str, use_itn: bool
    ) -> torch.Tensor:
        count = len(lengths)
        inputs = {
            "speech": batch.numpy(),
            "speech_lengths": np.asarray(lengths, dtype=np.int32),
            "language": np.full(count, LANGUAGE_IDS.get(language, 0), dtype=np.int32),
            "textnorm": np.full(count, TEXTNORM_IDS["withitn" if use_itn else "woitn"], dtype=np.int32),
        }
        logits, _ = self._session.run(None, inputs, getattr(self._local, "run_options", None))
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def load_frontend_and_tokenizer(folder: Path) -> tuple[Any, Any]:
    """funasr's ``WavFrontend`` and the sentencepiece tokenizer of a SenseVoice folder, without loading
    the network (the files named by ``configuration.json`` / ``config.yaml``, as funasr finds them).

    Raises:
        EngineError: a file is missing or unreadable.
    """
    import sentencepiece
    import yaml
    from funasr.frontends.wav_frontend import WavFrontend

    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EngineError(f"model: cannot read {folder / 'config.yaml'}: {exc}") from exc
    metas: dict[str, Any] = {}
    with_meta = folder / "configuration.json"
    if with_meta.is_file():
        try:
            metas = json.loads(with_meta.read_text()).get("file_path_metas", {}) or {}
        except (OSError, ValueError) as exc:
            raise EngineError(f"model: cannot read {with_meta}: {exc}") from exc
    frontend_conf = dict(config.get("frontend_conf") or {})
    cmvn_name = (metas.get("frontend_conf") or {}).get("cmvn_file") or "am.mvn"
    tokenizer_name = (
        (metas.get("tokenizer_conf") or {}).get("bpemodel")
        or (config.get("tokenizer_conf") or {}).get("bpemodel")
        or DEFAULT_TOKENIZER_FILE
    )
    for needed in (cmvn_name, tokenizer_name):
        if not (folder / needed).is_file():
            raise EngineError(f"model: folder {folder} has no {needed}, which SenseVoice needs")
    frontend_conf["cmvn_file"] = str(folder / cmvn_name)
    frontend = WavFrontend(**frontend_conf)
    frontend.dither = 0.0  # deterministic features, as the torch backend
    frontend.eval()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / tokenizer_name))
    return frontend, sp


def _check_signature(session: Any, path: Path) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs[:4] != ["speech", "speech_lengths", "language", "textnorm"] or "ctc_logits" not in outputs:
        raise EngineError(
            f"{path} is not funasr's SenseVoice export (inputs {inputs}, outputs {outputs}); export it with "
            "funasr's AutoModel(...).export(type='onnx') or let the server export model.pt"
        )


def _resolve_folder(name: str, config: EngineConfig) -> Path:
    """A local folder (which may hold only an export), or the hub id downloaded."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise EngineError(f"model: {local} is a file; pass the SenseVoice folder")
        if not (local / "config.yaml").is_file():
            raise EngineError(
                f"model: folder {local} has no config.yaml; pass a SenseVoice Small folder as downloaded "
                "from ModelScope (iic/SenseVoiceSmall) or Hugging Face (FunAudioLLM/SenseVoiceSmall)"
            )
        return local
    if hub.is_hub_id(name):
        return hub.download_model(name, config.hub)
    raise EngineError(
        f"model: folder {local} does not exist (and {name!r} is not a hub id such as iic/SenseVoiceSmall)"
    )
