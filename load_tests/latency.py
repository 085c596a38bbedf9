"""End-of-speech-to-final latency of one session at real-time pace (issue 2).

Starts the server as a subprocess on 127.0.0.1, streams espeak-ng sentences separated by pauses at
real-time pace through one session, and prints the median, 95th percentile and maximum of the latency
from the end of each sentence's speech to the arrival of its final. The end of speech is ground truth
(the sentence's last non-silent sample, from ``speech_with_pauses``), mapped to the wall time the client
sent the chunk that holds it; the model's word times are not used. The latency includes the endpointing
silence by definition (the server's default is 500 ms; ``--endpointing`` sets the client's value).

With a model that really transcribes (``--model tiny.en``), the word error rate of the finals against
the known sentences is printed too; with the random-weight SenseVoice it is meaningless (and printed
only as a sanity figure)::

    python load_tests/latency.py --model tiny.en
    python load_tests/latency.py --model /tmp/sv-full --dtype fp32
    python load_tests/latency.py --model /tmp/sv-full --dtype int8

``/tmp/sv-full`` (the default) is built when missing (full-size random SenseVoice Small, 936 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from stream_server.testing.speech import word_error_rate  # noqa: E402

DEFAULT_MODEL = "/tmp/sv-full"
QUICK_SENTENCES = ("Good morning everyone.", "Can you hear me now?", "Thank you all for coming today.")


def ensure_model(model: str) -> str:
    """Build the full-size random SenseVoice folder when the default path is asked for and missing."""
    if model == DEFAULT_MODEL:
        from stream_server.testing.sensevoice_random import build_random_sensevoice

        build_random_sensevoice(Path(model))
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="tiny.en, or a SenseVoice folder")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "int8"))
    parser.add_argument("--threads", type=int, default=0, help="model threads (0: every core)")
    parser.add_argument("--max-batch-size", type=int, default=0, help="0: the server's default")
    parser.add_argument(
        "--endpointing", type=int, default=None, help="client endpointing in ms (default: server's 500)"
    )
    parser.add_argument(
        "--material",
        default="espeak",
        choices=common.MATERIALS,
        help="espeak sentences, one side of a call of real recordings (call), or the recordings as "
        "they are (mix)",
    )
    parser.add_argument("--seed", type=int, default=7, help="order of the material")
    parser.add_argument("--sentences", type=int, default=24, help="espeak sentences (segments) to stream")
    parser.add_argument("--speed", type=float, default=1.0, help="times real time (1: live pace)")
    parser.add_argument("--chunk-ms", type=int, default=100, help="audio per WebSocket frame")
    parser.add_argument("--server-arg", action="append", default=[], help="another server flag (repeat)")
    parser.add_argument("--quick", action="store_true", help="3 short sentences at 4x (smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in logs
    print(f"machine: {common.machine_line()}")
    model = ensure_model(args.model)
    if args.quick:
        material = common.conversation(QUICK_SENTENCES, pauses_s=(0.8,), seed=1)
        speed = 4.0
    elif args.material == "espeak":
        material = common.conversation(pauses_s=(1.0, 1.5, 2.0), seed=args.seed, count=args.sentences)
        speed = args.speed
    else:
        material = common.material(args.material, seed=args.seed, min_pause_ms=args.endpointing or 500)
        speed = args.speed
    server_args = common.server_args(args, model)
    endpointing = f"{args.endpointing} ms (client)" if args.endpointing else "500 ms (server default)"
    print(
        f"material: {args.material if not args.quick else 'espeak'}, {len(material.spans)} utterances, "
        f"{material.duration_s:.1f} s, "
        f"speech {100 * material.speech_ratio:.0f} %; speed {speed:g}x; chunks {args.chunk_ms} ms; "
        f"endpointing {endpointing}"
    )
    server = common.ServerProcess(server_args)
    print("server: " + " ".join(server.command()))
    with server:
        model_info = server.health.get("model", {})
        print(
            f"ready in {server.ready_s:.1f} s: {model_info.get('name')} {model_info.get('dtype')} on "
            f"{model_info.get('device')}, {model_info.get('threads', '?')} threads; "
            f"RSS {common.rss_mb(server.pid):.0f} MB"
        )
        load_before = common.loadavg()
        params = {"endpointing": args.endpointing, "punctuate": True}
        started = time.monotonic()
        result = asyncio.run(
            common.stream_session(
                server.ws_url,
                material,
                duration_s=material.duration_s,
                speed=speed,
                chunk_ms=args.chunk_ms,
                params=params,
                keep_text=True,
                timeout_s=material.duration_s / speed + 300,
            )
        )
        wall = time.monotonic() - started
        rss = common.rss_mb(server.pid)
        values = common.scrape_metrics(server)
        load_after = common.loadavg()
    lat = result.final_latencies_s
    print(f"load average: before {load_before}; after {load_after}")
    print(
        f"streamed {result.audio_s:.1f} s in {wall:.1f} s; finals {result.finals}, "
        f"sentences {result.sentences_matched}/{result.sentences_sent} matched, "
        f"unmatched finals {result.unmatched_finals}, errors {result.errors or 'none'}; "
        f"server RSS {rss:.0f} MB"
    )
    print(
        f"end-of-speech-to-final latency over {len(lat)} segments: "
        f"median {common.fmt_s(common.percentile(lat, 50))} s, "
        f"p95 {common.fmt_s(common.percentile(lat, 95))} s, "
        f"max {common.fmt_s(max(lat) if lat else float('nan'))} s"
    )
    endpointing_s = (args.endpointing or 500) / 1000
    print(
        f"median minus endpointing: {common.fmt_s(common.percentile(lat, 50) - endpointing_s)} s "
        f"(target: at most 0.150 s)"
    )
    calls = common.metric(values, "stream_batch_size_count", 0.0, kind="final")
    if calls:
        infer = common.metric(values, "stream_inference_seconds_sum", 0.0, kind="final") / calls
        server_lat = common.metric(values, "stream_final_latency_seconds_sum", 0.0) / common.metric(
            values, "stream_final_latency_seconds_count", 1.0
        )
        print(
            f"server side (/metrics): {calls:.0f} model calls for finals, {infer:.3f} s each on average; "
            f"from the audio that closed a segment to its final: {server_lat:.3f} s on average"
        )
    if result.reference.strip():
        wer = word_error_rate(result.reference, result.transcript)
        note = "" if model == "tiny.en" else " (random weights: meaningless)"
        print(f"WER vs the known sentences: {100 * wer:.1f} %{note}")
    if lat and max(lat) > 0:
        print("per segment (s): " + " ".join(f"{x:.2f}" for x in lat))
    return 0 if lat and not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
