"""The live-captions page in real headless Chromium against real servers on 127.0.0.1.

Chromium's fake microphone plays espeak-ng speech into the page, the page streams it to a server running
the real faster-whisper tiny.en model, and the test checks the spoken words come back as captions and in
the downloaded SRT, with sane, increasing times. Also: the page streaming a chosen audio file; a server
that is down; a server that ends the stream with a fatal error; a refused microphone; a server with an
API key, which the page reaches with a grant token.

Each scenario is one run of ``client_js/test/e2e/run.mjs`` (playwright-core driving Debian's
``/usr/bin/chromium``), which prints what the page showed as JSON; the assertions are here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from stream_server.config import AuthConfig, BatchConfig, Config, EngineConfig, LimitsConfig
from stream_server.engines.base import Engine

from .conftest import scaled, skip_unless
from .fakes import FakeEngine
from .serving import running_server

CLIENT_JS = Path(__file__).resolve().parents[1] / "client_js"
RUN_MJS = CLIENT_JS / "test" / "e2e" / "run.mjs"
CHROMIUM = Path(os.environ.get("STREAM_SERVER_CHROMIUM", "/usr/bin/chromium"))
NODE = shutil.which("node")

MORNING = "Good morning everyone."
NOTEBOOKS = "Please remember to bring your notebooks to the meeting on Friday afternoon."
EXPECTED_WORDS = ["morning", "everyone", "notebooks", "meeting", "friday"]
BROWSER_KEY = "browser-test-key-0123456789abcdef"
"""The API key of the server with authentication (held by run.mjs as the operator's backend)."""
"""Words tiny.en gets right in this espeak speech at 100 words per minute (see test_engine_whisper)."""


def _missing() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not (CLIENT_JS / "node_modules" / "playwright-core").is_dir():
        return "client_js/node_modules is missing: run `npm ci --prefix client_js`"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: run `apt-get install -y chromium`"
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run `apt-get install -y espeak-ng sox`"
    return None


pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    skip_unless(_missing() is None, f"browser tests need more: {_missing()}"),
]


def test_browser_tools_are_installed() -> None:
    """Node, playwright-core, Chromium, espeak-ng and sox are all present for the browser tests."""
    assert _missing() is None, _missing()


# --------------------------------------------------------------------------------------------------
# Servers: one thread with its own event loop, shared by the module's tests


@dataclass(frozen=True)
class Servers:
    base: str
    """http:// of the server with the real tiny.en model."""
    error_base: str
    """http:// of a server (fake engine) that ends every stream after 2 s of audio (SESSION_TOO_LONG)."""
    down: str
    """ws:// of a port on 127.0.0.1 where nothing listens."""
    auth_base: str
    """http:// of a server (fake engine) that requires an API key (``captions:BROWSER_KEY``)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _load_tiny_en() -> Engine:
    from stream_server.engines.loader import load_engine

    return load_engine(EngineConfig(model="tiny.en", device="cpu"), max_audio_s=20, max_batch_size=4)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """The real-model server and the failing server on 127.0.0.1, running in a background thread."""
    engine = _load_tiny_en()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    found: dict[str, str] = {}
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        # Admission off: these tests are about the page, and on a busy 2-core machine the measured
        # capacity of tiny.en is about one stream, so a reconnect could be refused (CI flaked so).
        real_config = Config(batch=BatchConfig(max_batch_size=4), limits=LimitsConfig(admission=False))
        error_config = Config(limits=replace(LimitsConfig(), max_session_s=2.0))
        auth_config = Config(auth=AuthConfig(api_keys=(f"captions:{BROWSER_KEY}",)))
        try:
            async with (
                running_server(engine, real_config) as (_, real_url),
                running_server(FakeEngine(), error_config) as (_, error_url),
                running_server(FakeEngine(), auth_config) as (_, auth_url),
            ):
                found["base"] = real_url.replace("ws://", "http://")
                found["error_base"] = error_url.replace("ws://", "http://")
                found["auth_base"] = auth_url.replace("ws://", "http://")
                ready.set()
                await stop.wait()
        except BaseException as exc:  # reported to the test thread
            failure.append(exc)
            ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve())

    thread = threading.Thread(target=run, name="browser-test-servers", daemon=True)
    thread.start()
    assert ready.wait(scaled(60)), "the test servers did not start in time"
    if failure:
        raise failure[0]
    try:
        yield Servers(
            found["base"], found["error_base"], f"ws://127.0.0.1:{_free_port()}", found["auth_base"]
        )
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(scaled(30))
        if not thread.is_alive():
            loop.close()


@pytest.fixture(scope="module")
def speech_wav() -> Path:
    """Two espeak-ng sentences with 1 s pauses, 16 kHz mono 16-bit (Chromium's fake microphone takes it
    as it is and loops it)."""
    from stream_server.testing.speech import speech_with_pauses

    return speech_with_pauses([MORNING, NOTEBOOKS], pause_s=1.0)


def run_scenario(scenario: str, limit_s: float = 90.0, **args: Any) -> dict[str, Any]:
    """Run one run.mjs scenario and return what the page showed; fails with its output when it timed out."""
    assert NODE is not None
    payload = json.dumps({"scenario": scenario, "limit_ms": int(limit_s * 1000), **args})
    try:
        completed = subprocess.run(
            [NODE, str(RUN_MJS), payload],
            cwd=CLIENT_JS,
            capture_output=True,
            text=True,
            timeout=scaled(limit_s + 30),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"run.mjs {scenario} did not exit in time; stderr:\n{exc.stderr}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    assert lines, f"run.mjs {scenario} printed no JSON (exit {completed.returncode}):\n{completed.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    summary = json.dumps({k: v for k, v in result.items() if k not in ("srt", "vtt", "txt")}, indent=1)
    assert completed.returncode == 0 and "error" not in result, (
        f"scenario {scenario} failed:\n{summary}\n{completed.stderr}"
    )
    page_errors = [line for line in result["console"] if line.startswith("pageerror")]
    assert not page_errors, f"the page threw:\n{summary}"
    return result


# --------------------------------------------------------------------------------------------------
# SRT parsing

_SRT_TIME = re.compile(r"^(\d{2,}):(\d{2}):(\d{2}),(\d{3}) --> (\d{2,}):(\d{2}):(\d{2}),(\d{3})$")


@dataclass(frozen=True)
class Cue:
    index: int
    start_s: float
    end_s: float
    text: str


def parse_srt(text: str) -> list[Cue]:
    """Strict SRT: numbered blocks, one timing line, one or more text lines, blank-line separated."""
    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        assert len(lines) >= 3, f"SRT block too short: {block!r}"
        match = _SRT_TIME.match(lines[1])
        assert match, f"bad SRT timing line: {lines[1]!r}"
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups())
        cues.append(
            Cue(
                index=int(lines[0]),
                start_s=h1 * 3600 + m1 * 60 + s1 + ms1 / 1000,
                end_s=h2 * 3600 + m2 * 60 + s2 + ms2 / 1000,
                text=" ".join(lines[2:]),
            )
        )
    return cues


def assert_sane_times(cues: list[Cue], session_s: float) -> None:
    assert [c.index for c in cues] == list(range(1, len(cues) + 1))
    previous_end = 0.0
    for cue in cues:
        assert previous_end <= cue.start_s < cue.end_s <= session_s, f"cue times out of order: {cues}"
        assert cue.end_s - cue.start_s < 21, f"a cue longer than the longest segment: {cue}"
        previous_end = cue.end_s


def words_of(text: str) -> str:
    return re.sub(r"[^a-z ]", " ", text.lower())


# --------------------------------------------------------------------------------------------------
# Tests


def test_microphone_speech_becomes_captions_and_srt(servers: Servers, speech_wav: Path) -> None:
    """Speech on the (fake) microphone shows up as live captions, interim then final, and the downloaded
    SRT has the words with increasing times."""
    result = run_scenario("captions", base=servers.base, wav=str(speech_wav), expect=EXPECTED_WORDS)
    last = result["last"]
    assert last["stateKey"] == "closed"
    assert "Live" in result["states"]
    # The microphone ran at the audio device's rate and the page resampled it to 16 kHz itself.
    assert last["inputRateHz"] in (44100, 48000), last["inputRateHz"]
    shown = words_of(" ".join(result["captions"]))
    for word in EXPECTED_WORDS:
        assert word in shown, f"{word!r} never appeared in the captions: {result['captions']}"
    assert result["interims"], "no interim caption was shown while speaking"
    assert last["model"].startswith("Model faster-whisper-tiny.en")
    assert last["fallback"] == "", "tiny.en was asked for: no fallback banner"
    assert re.match(r"Latency \d+\.\d\d s · avg \d+\.\d\d s", last["latency"]), last["latency"]
    assert all("English" in item["tags"] for item in last["transcript"])

    cues = parse_srt(result["srt"]["text"])
    assert result["srt"]["name"].endswith(".srt")
    # The page ran for at most the scenario's wall time; the cues lie inside it.
    assert_sane_times(cues, session_s=result["timings"]["stopped_ms"] / 1000 + 1)
    srt_words = words_of(" ".join(c.text for c in cues))
    for word in EXPECTED_WORDS:
        assert word in srt_words
    assert result["vtt"]["text"].startswith("WEBVTT\n\n")
    assert "notebooks" in result["txt"]["text"].lower()


def test_audio_file_is_captioned_on_the_file_timeline(
    servers: Servers, speech_wav: Path, tmp_path: Path
) -> None:
    """A chosen audio file (44.1 kHz) is streamed at real-time pace; its captions carry the file's own
    times."""
    from stream_server.testing.speech import sentence_spans

    wav_44k = tmp_path / "speech-44k.wav"
    subprocess.run(["sox", str(speech_wav), "-r", "44100", str(wav_44k)], check=True, timeout=scaled(60))
    result = run_scenario("file", base=servers.base, wav=str(wav_44k))
    spans = sentence_spans(speech_wav)
    file_s = spans[-1].end_s + 1.0
    # Real-time pace: the page cannot have finished much sooner than the file lasts.
    assert result["timings"]["finished_ms"] / 1000 >= file_s - 0.5
    assert any("transcribed" in m for m in result["messages"])
    assert result["last"]["inputRateHz"] == 44100, "a WAV is decoded at its own rate, then resampled"
    cues = parse_srt(result["srt"]["text"])
    assert_sane_times(cues, session_s=file_s + 0.1)
    text = words_of(" ".join(c.text for c in cues))
    for word in EXPECTED_WORDS:
        assert word in text
    # Each sentence's cue lies where the sentence is in the file (segments carry ~0.3 s of pre/post-roll).
    for span, key in zip(spans, ("morning", "notebooks"), strict=True):
        cue = next(c for c in cues if key in words_of(c.text))
        assert span.start_s - 0.8 <= cue.start_s <= span.start_s + 0.5, (span, cue)
        assert span.end_s - 0.5 <= cue.end_s <= span.end_s + 0.8, (span, cue)


def test_reconnect_keeps_finals_and_resends_unfinished_speech(servers: Servers, speech_wav: Path) -> None:
    """When the connection is cut mid-sentence, the page reconnects, keeps the finals it had, and the
    cut sentence still comes out whole, at its place on the timeline (its audio is sent again)."""
    from stream_server.testing.speech import sentence_spans

    result = run_scenario(
        "reconnect",
        base=servers.base,
        wav=str(speech_wav),
        cut_when=["please", "remember", "bring"],
        expect=["notebooks", "friday"],
    )
    assert result["connections"] == 2
    assert any(state.startswith("Reconnecting in") for state in result["states"])
    assert any("code 1012" in m for m in result["messages"]), result["messages"]
    assert any(m.startswith("Reconnected to the server. Resent") for m in result["messages"])
    transcript = result["last"]["transcript"]
    assert transcript[: len(result["before"])] == result["before"], "a final from before the cut was lost"

    spans = sentence_spans(speech_wav)
    loop_s = spans[-1].end_s + 1.0  # Chromium loops the file; the first pass ends here
    cues = parse_srt(result["srt"]["text"])
    assert_sane_times(cues, session_s=120)
    # "Please" was heard before the cut (its interim was on screen), so only resending that audio
    # lets the new stream transcribe the sentence from its start, during the file's first pass.
    cut_sentence = [c for c in cues if "please remember" in words_of(c.text) and c.start_s < loop_s]
    assert cut_sentence, f"the cut sentence did not survive the reconnect: {cues}"
    assert abs(cut_sentence[0].start_s - spans[1].start_s) < 0.8


def test_server_down_gives_a_clear_message(servers: Servers, speech_wav: Path) -> None:
    """With no server listening, the page says it cannot connect and that the server is unreachable."""
    result = run_scenario("server-down", base=servers.base, down=servers.down, wav=str(speech_wav))
    message = result["messages"][0]
    assert "Could not connect" in message and servers.down in message
    assert "not reachable" in message
    assert "Retrying in" in message
    assert result["last"]["model"].startswith("Server unreachable")


def test_server_error_shows_description_and_close_code(servers: Servers, speech_wav: Path) -> None:
    """A stream the server ends with a fatal Error shows that Error's description and the close code."""
    result = run_scenario("server-error", base=servers.error_base, wav=str(speech_wav))
    message = result["last"]["message"]
    assert "SESSION_TOO_LONG" in message
    assert "limits a stream to 2 s of audio" in message
    assert "code 1008" in message
    assert result["last"]["messageKind"] == "error"
    assert result["last"]["state"] == "Failed"


def test_refused_microphone_gives_a_clear_message(servers: Servers, speech_wav: Path) -> None:
    """When the microphone permission is denied, the page says so and how to fix it."""
    result = run_scenario("mic-denied", base=servers.base, wav=str(speech_wav))
    message = result["last"]["message"]
    assert "Microphone access was refused" in message
    assert "audio file" in message
    assert result["last"]["state"] == "Failed"


def test_page_connects_with_a_grant_token_over_the_bearer_subprotocol(
    servers: Servers, speech_wav: Path
) -> None:
    """On a server with an API key, the page without a token source says it needs one; given
    ?token_url= (an endpoint that holds the key, as an operator's backend would) it fetches a grant token
    before connecting and streams with the bearer subprotocol, the key never reaching the page."""
    result = run_scenario("auth", base=servers.auth_base, wav=str(speech_wav), key=BROWSER_KEY)
    assert "requires a token" in result["bare_message"] and "token_url" in result["bare_message"]
    assert result["protocol"] == "bearer", "the server selected the bearer subprotocol the page offered"
    assert result["grants"] >= 1 and result["key_in_page"] is False
    assert result["last"]["transcript"], "the stream was transcribed"
    with urllib.request.urlopen(f"{servers.auth_base}/metrics", timeout=scaled(10)) as response:
        metrics = response.read().decode()
    assert 'stream_auth_accepted_total{key="captions",method="token"}' in metrics
    assert 'method="key"' not in metrics, "the page never used the key itself"


# --------------------------------------------------------------------------------------------------
# Following a phone call (?call=): a server with the fake engine, a real two-track Twilio call

_FOLLOW_MJS = """
import fs from 'node:fs';
import { launch, scaled, until } from %(browser)s;

const args = JSON.parse(process.argv[2]);
const out = { console: [] };
const browser = await launch({});
fs.writeFileSync(args.ready, 'ready');
const snapshot = (page) =>
  page.evaluate(() => ({
    state: document.getElementById('state').textContent.trim(),
    stateKey: document.getElementById('state').dataset.state,
    message: document.getElementById('message-text').textContent,
    captions: [...document.querySelectorAll('#captions .final')].map((e) => e.textContent),
    transcript: [...document.querySelectorAll('#transcript li')].map((li) => ({
      time: li.querySelector('time').textContent,
      speaker: li.querySelector('.speaker')?.textContent ?? null,
      text: li.querySelector('.text').textContent,
    })),
    startHidden: !document.getElementById('start').checkVisibility(),
  }));
async function open(query) {
  const page = await browser.context.newPage();
  page.on('pageerror', (error) => out.console.push(`pageerror: ${error.message}`));
  await page.goto(`${args.base}/${query}`, { waitUntil: 'load', timeout: scaled(15000) });
  return page;
}
try {
  await until(
    async () => {
      const { calls } = await (await fetch(`${args.base}/v1/calls`)).json();
      return calls.some((c) => c.call_sid === args.call_sid);
    },
    scaled(20000),
    'the call to be listed',
  );
  const page = await open(`?call=${args.call_sid}`);
  const live = async () => ((await snapshot(page)).stateKey === 'open' ? true : null);
  out.live = await until(live, scaled(15000), 'the Live call state');
  const list = await open('?calls');
  out.listed = await until(async () => {
    const links = await list.evaluate(
      () => [...document.querySelectorAll('#calls-list a')].map((a) => a.search),
    );
    return links.length ? links : null;
  }, scaled(15000), 'the calls list');
  out.followed = await until(async () => {
    const snap = await snapshot(page);
    return snap.stateKey === 'closed' ? snap : null;
  }, scaled(60000), 'the call to end');
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download-txt')]);
  out.txt = fs.readFileSync(await download.path(), 'utf8');
  const unknown = await open('?call=CA' + '0'.repeat(32));
  out.unknown = await until(async () => {
    const snap = await snapshot(unknown);
    return snap.stateKey === 'failed' ? snap : null;
  }, scaled(15000), 'the unknown call to be refused');
} catch (error) {
  out.error = String(error);
} finally {
  await browser.close();
  process.stdout.write(`${JSON.stringify(out)}\\n`);
}
"""


def _two_track_call() -> Any:
    """The caller speaks (tone) from 0.5 to 2.5 s, the agent from 4.5 to 6.0 s; 10 s in all, at 8 kHz."""
    import numpy as np

    from stream_server.testing.twilio_replay import TwilioCallAudio

    from .synth import silence, tone

    inbound = np.concatenate([silence(500, rate=8000), tone(2000, rate=8000), silence(7500, rate=8000)])
    outbound = np.concatenate(
        [silence(4500, rate=8000), tone(1500, freq_hz=330, rate=8000), silence(4000, rate=8000)]
    )
    return TwilioCallAudio(inbound, outbound)


def test_page_follows_a_live_call_with_caller_and_agent_labels(tmp_path: Path) -> None:
    """Opened with ?call=<sid> during a real two-track Twilio call, the page shows the inbound final as
    "Caller" and the outbound one as "Agent" in time order, says when the call ended, labels the
    speakers in the text download, lists the call under ?calls, and says clearly when a call is not
    live."""
    import time

    from stream_server.testing.twilio_replay import replay_call

    assert NODE is not None
    call_sid = "CA" + "7" * 32
    script = tmp_path / "follow.mjs"
    script.write_text(_FOLLOW_MJS % {"browser": json.dumps((RUN_MJS.parent / "browser.mjs").as_uri())})
    ready = tmp_path / "ready"
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    found: dict[str, str] = {}

    async def serve() -> None:
        async with running_server(FakeEngine(), Config()) as (_, url):
            found["url"] = url
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert started.wait(scaled(60)), "the test server did not start in time"
        base = found["url"].replace("ws://", "http://")
        node = subprocess.Popen(
            [NODE, str(script), json.dumps({"base": base, "call_sid": call_sid, "ready": str(ready)})],
            cwd=CLIENT_JS,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for _ in range(int(scaled(60) / 0.1)):  # Chromium is up before the call starts
                if ready.exists() or node.poll() is not None:
                    break
                time.sleep(0.1)
            call = asyncio.run_coroutine_threadsafe(
                replay_call(f"{found['url']}/v1/twilio", _two_track_call(), speed=1.0, call_sid=call_sid),
                loop,
            )
            stdout, stderr = node.communicate(timeout=scaled(120))
        finally:
            if node.poll() is None:
                node.kill()
                node.communicate()
        report = call.result(timeout=scaled(30))
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(scaled(30))
    assert report.close_code == 1000
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"follow.mjs printed no JSON:\n{stderr}"
    result = json.loads(lines[-1])
    assert "error" not in result and not result["console"], f"{result}\n{stderr}"

    followed = result["followed"]
    assert followed["startHidden"], "a followed call has nothing to start"
    assert followed["state"] == "Call ended" and "call has ended" in followed["message"]
    transcript = followed["transcript"]
    assert [item["speaker"] for item in transcript] == ["Caller", "Agent"], transcript
    assert all(re.fullmatch(r"(Caller|Agent) clip \d+\.\d\d", item["text"]) for item in transcript)
    assert transcript[0]["time"] < transcript[1]["time"], "finals are listed in time order"
    assert [c.split(" ")[0] for c in followed["captions"]] == ["Caller", "Agent"]
    txt_lines = result["txt"].splitlines()
    assert [line.split("] ")[1].split(":")[0] for line in txt_lines] == ["Caller", "Agent"], txt_lines

    assert result["listed"] == [f"?call={call_sid}"], "?calls links the live call to ?call="
    unknown = result["unknown"]
    assert unknown["state"] == "Not found"
    assert f"No live call CA{'0' * 32}" in unknown["message"]
