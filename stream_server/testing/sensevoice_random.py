"""Build a SenseVoice Small model folder with random weights.

The folder has the layout of the real release (``iic/SenseVoiceSmall`` on ModelScope) and loads
through the same ``funasr.AutoModel(model=<folder>, disable_update=True)`` path:

- ``configuration.json`` - points funasr at the files below (``file_path_metas``), as the release does;
- ``config.yaml``        - the release architecture (``SenseVoiceEncoderSmall``, 512 wide, 50 + 20 blocks);
- ``model.pt``           - a ``state_dict`` of randomly initialised weights (seeded);
- ``am.mvn``             - Kaldi-nnet CMVN stats for the 560-dim LFR features (80 mels x 7);
- ``chn_jpn_yue_eng_ko_spectok.bpe.model`` - a sentencepiece BPE model with the release's vocabulary
  size (25055) whose special tags (``<|en|>``, ``<|NEUTRAL|>``, ``<|woitn|>``...) sit at the ids funasr's
  ``SenseVoiceSmall`` hard-codes (``lid_int_dict``, ``emo_dict``, ``textnorm_int_dict``); every other
  piece is a gibberish syllable word, so decoded text is meaningless but well formed.

Same compute and memory as the real model, meaningless text. ``--small`` builds 2 + 1 blocks for fast
unit tests (same code path, a few MB). Building is idempotent: a stamp file records the settings and a
second call with the same settings returns at once.

Usage::

    python -m stream_server.testing.sensevoice_random OUT_DIR [--small] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

VOCAB_SIZE = 25055
"""Vocabulary size of the release tokenizer (and rows of the CTC output layer)."""

LFR_DIM = 560
"""Encoder input width: 80 mel bins stacked 7 frames deep (low frame rate, m=7, n=6)."""

TOKENIZER_FILE = "chn_jpn_yue_eng_ko_spectok.bpe.model"
STAMP_FILE = ".stream_server_random.json"
_STAMP_VERSION = 1

SPECIAL_TOKEN_IDS: dict[int, str] = {
    # Ids from funasr's SenseVoiceSmall (lid_int_dict, emo_dict, textnorm_int_dict): exact.
    24884: "<|zh|>",
    24885: "<|en|>",
    24888: "<|yue|>",
    24892: "<|ja|>",
    24896: "<|ko|>",
    24992: "<|nospeech|>",
    25001: "<|HAPPY|>",
    25002: "<|SAD|>",
    25003: "<|ANGRY|>",
    25004: "<|NEUTRAL|>",
    25009: "<|EMO_UNKNOWN|>",
    25016: "<|withitn|>",
    25017: "<|woitn|>",
    # Event tags: funasr does not name their ids; placed next to <|nospeech|>.
    24993: "<|Speech|>",
    24994: "<|BGM|>",
    24995: "<|Applause|>",
    24996: "<|Laughter|>",
    24997: "<|Event_UNK|>",
}
"""SenseVoice's tags and the token ids they get in the random tokenizer."""

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

_CONFIG_YAML = """\
encoder: SenseVoiceEncoderSmall
encoder_conf:
    output_size: 512
    attention_heads: 4
    linear_units: 2048
    num_blocks: {num_blocks}
    tp_blocks: {tp_blocks}
    dropout_rate: 0.1
    positional_dropout_rate: 0.1
    attention_dropout_rate: 0.1
    input_layer: pe
    pos_enc_class: SinusoidalPositionEncoder
    normalize_before: true
    kernel_size: 11
    sanm_shfit: 0
    selfattention_layer_type: sanm

model: SenseVoiceSmall
model_conf:
    length_normalized_loss: true
    sos: 1
    eos: 2
    ignore_id: -1

tokenizer: SentencepiecesTokenizer
tokenizer_conf:
    bpemodel: null
    unk_symbol: <unk>
    split_with_space: true

frontend: WavFrontend
frontend_conf:
    fs: 16000
    window: hamming
    n_mels: 80
    frame_length: 25
    frame_shift: 10
    lfr_m: 7
    lfr_n: 6
    cmvn_file: null
"""

_CONFIGURATION_JSON = {
    "framework": "pytorch",
    "task": "auto-speech-recognition",
    "model": {"type": "funasr"},
    "pipeline": {"type": "funasr-pipeline"},
    "model_name_in_hub": {"ms": "", "hf": ""},
    "file_path_metas": {
        "init_param": "model.pt",
        "config": "config.yaml",
        "tokenizer_conf": {"bpemodel": TOKENIZER_FILE},
        "frontend_conf": {"cmvn_file": "am.mvn"},
    },
}

_MODEL_FILES = ("configuration.json", "config.yaml", "model.pt", "am.mvn", TOKENIZER_FILE)


def build_random_sensevoice(
    out_dir: Path, *, num_blocks: int = 50, tp_blocks: int = 20, seed: int = 0
) -> Path:
    """Write a SenseVoice Small folder with random weights, unless one with these settings is there.

    Args:
        out_dir: folder to write (created if missing). Files already there with other settings are
            overwritten.
        num_blocks: encoder blocks (50 in the release; 2 for unit tests).
        tp_blocks: second-stage encoder blocks (20 in the release; 1 for unit tests).
        seed: seed for the weights and the tokenizer's gibberish vocabulary.

    Returns:
        ``out_dir``, ready for ``funasr.AutoModel(model=str(out_dir), disable_update=True)``.

    Raises:
        ValueError: a block count out of range.
        RuntimeError: sentencepiece produced a vocabulary of the wrong size.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, not {num_blocks}")
    if tp_blocks < 0:
        raise ValueError(f"tp_blocks must be at least 0, not {tp_blocks}")
    out_dir = Path(out_dir)
    stamp = {"version": _STAMP_VERSION, "num_blocks": num_blocks, "tp_blocks": tp_blocks, "seed": seed}
    if _is_built(out_dir, stamp):
        logger.debug("random SenseVoice folder %s already built with %s", out_dir, stamp)
        return out_dir

    started_s = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP_FILE).unlink(missing_ok=True)
    _write_bytes(out_dir / TOKENIZER_FILE, _tokenizer_model_bytes(seed))
    _write_bytes(out_dir / "am.mvn", _am_mvn_text().encode())
    _write_bytes(
        out_dir / "config.yaml", _CONFIG_YAML.format(num_blocks=num_blocks, tp_blocks=tp_blocks).encode()
    )
    _write_bytes(out_dir / "configuration.json", (json.dumps(_CONFIGURATION_JSON, indent=2) + "\n").encode())
    _write_weights(out_dir / "model.pt", num_blocks=num_blocks, tp_blocks=tp_blocks, seed=seed)
    # The stamp goes last: a build interrupted half-way is redone next time.
    _write_bytes(out_dir / STAMP_FILE, (json.dumps(stamp) + "\n").encode())
    logger.info(
        "built random SenseVoice folder %s (%s) in %.1f s", out_dir, stamp, time.perf_counter() - started_s
    )
    return out_dir


def _is_built(out_dir: Path, stamp: dict[str, int]) -> bool:
    try:
        found = json.loads((out_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(found == stamp and all((out_dir / name).is_file() for name in _MODEL_FILES))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary name, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tokenizer_model_bytes(seed: int) -> bytes:
    """Train a BPE model with the release's size and the tags at funasr's hard-coded ids.

    Sentencepiece numbers pieces as: ``<unk>`` 0 (SenseVoice's CTC blank), ``<s>`` 1, ``</s>`` 2, then the
    user-defined symbols in the order given, then the learnt pieces. So ids 3..25017 are user-defined
    (gibberish words, with the tags slotted in at their ids) and the rest (single letters and a few
    merges of the training text) fill the vocabulary up to 25055.
    """
    import sentencepiece as spm

    rng = random.Random(seed)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words = sorted(
        {a + b for a in syllables for b in syllables}
        | {a + b + c for a in syllables for b in syllables for c in syllables[:8]}
    )
    rng.shuffle(words)
    last_user_id = max(SPECIAL_TOKEN_IDS)
    user_symbols: list[str] = []
    word_iter = iter(words)
    for token_id in range(3, last_user_id + 1):
        special = SPECIAL_TOKEN_IDS.get(token_id)
        if special is not None:
            user_symbols.append(special)
        else:
            # Half the pieces start a word (leading U+2581), half continue one, as in a real BPE vocabulary.
            word = next(word_iter)
            user_symbols.append("\u2581" + word if token_id % 2 else word)
    sentences = [
        " ".join(rng.choice(syllables) + rng.choice(syllables) for _ in range(12)) for _ in range(2000)
    ]

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        user_defined_symbols=user_symbols,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    data = model.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=data)
    if processor.get_piece_size() != VOCAB_SIZE:
        raise RuntimeError(f"random tokenizer has {processor.get_piece_size()} pieces, expected {VOCAB_SIZE}")
    for token_id, piece in SPECIAL_TOKEN_IDS.items():
        if processor.piece_to_id(piece) != token_id:
            raise RuntimeError(
                f"random tokenizer put {piece} at {processor.piece_to_id(piece)}, not {token_id}"
            )
    return data


def _am_mvn_text() -> str:
    """Kaldi-nnet text CMVN for 560-dim LFR features, in the layout funasr's ``load_cmvn`` parses.

    ``<AddShift>`` holds minus the mean and ``<Rescale>`` one over the standard deviation of each of the
    80 log-mel bins (plausible values for speech at 16 kHz), tiled 7 times for the LFR stacking.
    """
    shifts = [-(13.5 - 3.0 * (i / 79.0)) for i in range(80)] * 7
    scales = [0.28 + 0.04 * (i / 79.0) for i in range(80)] * 7
    shift_text = " ".join(f"{v:.6f}" for v in shifts)
    scale_text = " ".join(f"{v:.6f}" for v in scales)
    return (
        "<Nnet>\n"
        f"<Splice> {LFR_DIM} {LFR_DIM}\n"
        "[ 0 ]\n"
        f"<AddShift> {LFR_DIM} {LFR_DIM}\n"
        f"<LearnRateCoef> 0 [ {shift_text} ]\n"
        f"<Rescale> {LFR_DIM} {LFR_DIM}\n"
        f"<LearnRateCoef> 0 [ {scale_text} ]\n"
        "</Nnet>\n"
    )


def _write_weights(path: Path, *, num_blocks: int, tp_blocks: int, seed: int) -> None:
    """Instantiate funasr's own ``SenseVoiceSmall`` with seeded default init and save its state dict."""
    import torch

    # funasr prints a notice about ffmpeg to stdout on import; keep stdout for the folder path (CLI).
    with contextlib.redirect_stdout(sys.stderr):
        import funasr.models.sense_voice.model  # noqa: F401  (registers SenseVoiceSmall and its encoder)
        from funasr.register import tables

    encoder_conf = {
        "output_size": 512,
        "attention_heads": 4,
        "linear_units": 2048,
        "num_blocks": num_blocks,
        "tp_blocks": tp_blocks,
        "dropout_rate": 0.1,
        "positional_dropout_rate": 0.1,
        "attention_dropout_rate": 0.1,
        "input_layer": "pe",
        "pos_enc_class": "SinusoidalPositionEncoder",
        "normalize_before": True,
        "kernel_size": 11,
        "sanm_shfit": 0,
        "selfattention_layer_type": "sanm",
    }
    model_class = tables.model_classes["SenseVoiceSmall"]
    with _fork_torch_rng(seed):
        model = model_class(
            encoder="SenseVoiceEncoderSmall",
            encoder_conf=encoder_conf,
            input_size=LFR_DIM,
            vocab_size=VOCAB_SIZE,
            ignore_id=-1,
            sos=1,
            eos=2,
            length_normalized_loss=True,
        )
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)  # straight to disk: no second in-memory copy of ~1 GB
    os.replace(tmp, path)


class _fork_torch_rng:
    """Seed torch's global generator inside the block and restore it afterwards."""

    def __init__(self, seed: int) -> None:
        self._seed = seed

    def __enter__(self) -> None:
        import torch

        self._state = torch.random.get_rng_state()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.random.set_rng_state(self._state)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the folder and print its path.

    Args:
        argv: arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m stream_server.testing.sensevoice_random",
        description="Build a SenseVoice Small folder with random weights (real layers, gibberish text).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write")
    parser.add_argument("--small", action="store_true", help="2 + 1 encoder blocks (a few MB) for unit tests")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and vocabulary (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    blocks = {"num_blocks": 2, "tp_blocks": 1} if args.small else {"num_blocks": 50, "tp_blocks": 20}
    print(build_random_sensevoice(args.out_dir, seed=args.seed, **blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
