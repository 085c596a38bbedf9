"""The load-test scripts (load_tests/) run end to end in ``--quick`` mode and print sane figures.

They are scripts that print figures, not timed tests: these smoke tests only make sure they cannot rot.
Each starts a real server subprocess on 127.0.0.1 (faster-whisper tiny.en, or the 2-block random
SenseVoice) and streams a few seconds of audio.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import scaled

pytestmark = [pytest.mark.e2e, pytest.mark.model]

LOAD_TESTS = Path(__file__).resolve().parents[1] / "load_tests"


def run_script(name: str, *args: str, timeout_s: float = 120.0) -> str:
    """Run ``load_tests/NAME --quick ARGS`` and return its stdout (it must exit 0)."""
    completed = subprocess.run(
        [sys.executable, str(LOAD_TESTS / name), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=scaled(timeout_s),
        cwd=LOAD_TESTS.parent,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert re.search(r"load average", completed.stdout), completed.stdout
    return completed.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


def test_latency_script_measures_every_segment_and_the_wer() -> None:
    """latency.py with tiny.en: three spoken sentences give three latencies and a low WER."""
    out = run_script("latency.py", "--model", "tiny.en")
    assert number(r"latency over (\d+) segments", out) == 3
    median = number(r"median ([\d.]+) s", out)
    assert 0.05 < median < scaled(5), out
    assert number(r"p95 ([\d.]+) s", out) >= median
    assert number(r"WER vs the known sentences: ([\d.]+) %", out) < 40, out
    assert "sentences 3/3 matched" in out and "errors none" in out


def test_capacity_script_sweeps_and_reruns_half_load() -> None:
    """capacity.py prints a row per N, the capacity line that follows from those rows, and the half-load
    percentiles. (What N this machine holds is a measurement, not something to assert: the target is
    set far above any latency a working server has, and the line is checked against the rows.)"""
    target_s = scaled(30)
    out = run_script(
        "capacity.py", "--model", "tiny.en", "--dtype", "auto", "--interim", "--target-s", f"{target_s:g}"
    )
    sweep = out.split("capacity: largest N")[0]  # the half-load row comes after
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", sweep, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [1, 2], out
    for _, segs, p50, p95, p99 in rows:
        assert int(segs) >= 1 and 0 < float(p50) <= float(p95) <= float(p99), out
    best = 0
    for n, _, _, p95, _ in rows:  # the largest N before the first over the target or with errors
        if float(p95) >= target_s or f"errors at N={n}:" in out:
            break
        best = int(n)
    assert best >= 1, out
    assert number(rf"largest N with p95 final latency < {target_s:g} s: (\d+)", out) == best
    assert f"half load, N={max(1, best // 2)}:" in out
    assert number(r"final latency \(s\):\s+n=(\d+)", out) >= 1
    assert number(r"interim latency \(s\):\s+n=(\d+)", out) >= 1


def test_soak_script_samples_rss_and_saves_the_plot(small_model_dir: Path, tmp_path: Path) -> None:
    """soak.py streams two minutes of meeting audio at full speed and prints RSS, drift and a PNG."""
    out = run_script("soak.py", "--model", str(small_model_dir), "--out", str(tmp_path))
    after_1 = number(r"RSS after 1 min of audio per session: (\d+) MB", out)
    assert 100 < after_1 < 20000, out
    drift = number(r"drift: .*\(([+-][\d.]+) %\)", out)
    assert -50 < drift < 50, out
    assert "errors: none" in out
    png = tmp_path / "soak.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "soak.csv").read_text().splitlines()) >= 5


def test_contrast_script_measures_naive_and_ours(small_model_dir: Path) -> None:
    """contrast.py decodes 8 s the naive way in a fresh process and through the server, and tabulates both."""
    out = run_script("contrast.py", "--model", str(small_model_dir))
    row = r"^\s+8s \|\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+) \|\s+(\d+)\s+(\d+)\s+([\d.]+)"
    match = re.search(row, out, re.MULTILINE)
    assert match, out
    loaded, peak, maxrss, decode_s, ours_before, ours_peak, stream_s = map(float, match.groups())
    assert 100 < loaded <= peak <= maxrss, out
    assert 0 < decode_s < scaled(60) and 0 < stream_s < scaled(60), out
    assert 100 < ours_before and ours_peak > 100, out


def test_overload_script_admits_and_refuses() -> None:
    """overload.py offers twice the given capacity and prints admitted, refused and the latency line."""
    out = run_script("overload.py", "--model", "tiny.en", "--capacity", "1")
    match = re.search(r"^\s+2\s+(\d+)\s+(\d+)\s+(\d+)", out, re.MULTILINE)
    assert match, out
    admitted, refused, finals = map(int, match.groups())
    assert admitted + refused == 2 and admitted >= 1 and finals >= 1, out
    assert "admitted sessions hurt" in out


def test_fast_clients_script_finishes_every_client_with_every_final() -> None:
    """fast_clients.py streams unpaced with websockets' keepalive and checks the finals owed."""
    out = run_script("fast_clients.py", "--model", "tiny.en")
    assert "every client complete" in out and "NOT every" not in out, out
    assert number(r"peak (\d+) MB", out) > 50


def test_scheduling_script_compares_configurations() -> None:
    """scheduling.py runs one step per configuration and prints a row for each."""
    out = run_script("scheduling.py", "--model", "tiny.en", timeout_s=240)
    rows = re.findall(r"^(1x2|2x1-b2)\s+(\d+)\s+([\d.]+)\s+([\d.]+)", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["1x2", "2x1-b2"], out
    assert all(int(r[1]) >= 1 and float(r[2]) <= float(r[3]) for r in rows), out


def test_vad_lag_script_measures_the_hang_on_real_recordings() -> None:
    """vad_lag.py feeds recordings through the session core and prints the hang per configuration."""
    out = run_script("vad_lag.py", timeout_s=180)
    assert "hang" in out, out


def test_peers_script_runs_our_side(tmp_path: Path) -> None:
    """peers.py with --only ours measures our server on the same workload it gives WhisperLive."""
    out = run_script("peers.py", "--only", "ours", "--out", str(tmp_path / "peers.json"), timeout_s=180)
    match = re.search(r"^ours\s+1\s+3\s+3/3\s+3\s+([\d.]+)", out, re.MULTILINE)
    assert match, out
    assert 0.05 < float(match.group(1)) < scaled(5), out


def test_hostile_script_attacks_and_checks_the_baseline() -> None:
    """hostile.py runs honest sessions alone and under every kind of hostile client, reports what the
    server did to each kind, and compares fds and tasks with the baseline afterwards."""
    out = run_script("hostile.py", "--model", "tiny.en", timeout_s=240)
    assert re.search(r"^\s+alone: 1 honest", out, re.MULTILINE) and re.search(r"attacked: 1 honest", out), out
    for kind in ("keepalive", "non_reader", "slowloris", "garbage", "oversized", "finalize_spam", "churn"):
        assert re.search(rf"^\s+{kind}:\s+\d+ tries", out, re.MULTILINE), out
    assert "back to baseline" in out, out


def test_socket_fuzzer_finds_no_crash_and_no_undocumented_answer() -> None:
    """fuzz_socket.py's smoke run: random frames against the real transport, every answer documented
    and nothing logged as an unhandled error."""
    out = run_script("fuzz_socket.py")
    assert "OK: 0 crashes and every response documented" in out, out
    sent = re.search(r"^(\d+) frames in (\d+) connections", out, re.MULTILINE)
    assert sent and int(sent.group(1)) >= 5000 and int(sent.group(2)) > 4, out


def test_calls_script_measures_an_eight_channel_session_and_a_twilio_call() -> None:
    """calls.py streams an 8-channel session and prints the server's RSS around it, then replays a
    two-track Twilio call at real time and prints its latency."""
    out = run_script("calls.py", timeout_s=240)
    assert re.search(r"8-channel session, 8 s at real time, \d+ finals: server RSS before \d+ MB", out), out
    # calls, inbound p50/p95, outbound p50/p95 (a track may have no whole utterance in 8 s: "-"),
    # both p50/p95, finals, errors
    row = re.search(
        r"^\s+1\s+(?:[\d.]+|-)\s+(?:[\d.]+|-)\s+(?:[\d.]+|-)\s+(?:[\d.]+|-)\s+([\d.]+)\s+([\d.]+)"
        r"\s+(\d+)\s+(\d+)",
        out,
        re.MULTILINE,
    )
    assert row, out
    assert 0.0 < float(row.group(1)) <= float(row.group(2)) < scaled(10), out
    assert int(row.group(3)) >= 2 and int(row.group(4)) == 0, out


def test_funasr_script_measures_a_2pass_session() -> None:
    """funasr_latency.py streams a 2pass session with FunASR's protocol and prints its latency."""
    out = run_script("funasr_latency.py", timeout_s=240)
    match = re.search(r"(\d+) matched to utterances; end of speech -> 2pass-offline p50 ([\d.]+) s", out)
    assert match and int(match.group(1)) >= 1, out
