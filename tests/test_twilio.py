"""Twilio Media Streams: message parsing, the track timeline, channels, signatures and the operator doc."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from stream_server.errors import ClientError, CloseCode, ProtocolViolation
from stream_server.twilio import (
    BYTES_PER_MS,
    EVENTS,
    MULAW_SILENCE,
    TRACK_CHANNELS,
    TrackTimeline,
    TwilioConnected,
    TwilioDtmf,
    TwilioInputError,
    TwilioMark,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
    channels_for_tracks,
    parse_twilio_message,
    signed_url,
    twilio_signature_valid,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "twilio.md"

ACCOUNT = "AC" + "a" * 32
CALL = "CA" + "c" * 32
STREAM = "MZ" + "1" * 32
TOKEN = "12345678901234567890123456789012"
PUBLIC_WSS = "wss://calls.example.com/v1/twilio"

# The example shapes from https://www.twilio.com/docs/voice/media-streams/websocket-messages, with
# this file's placeholder SIDs.
CONNECTED = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": ACCOUNT,
        "streamSid": STREAM,
        "callSid": CALL,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"},
    },
    "streamSid": STREAM,
}
PAYLOAD = bytes(range(0x40, 0x40 + 160))  # 20 ms of mu-law
MEDIA = {
    "event": "media",
    "sequenceNumber": "3",
    "media": {
        "track": "outbound",
        "chunk": "1",
        "timestamp": "5",
        "payload": base64.b64encode(PAYLOAD).decode("ascii"),
    },
    "streamSid": STREAM,
}
STOP = {
    "event": "stop",
    "sequenceNumber": "5",
    "stop": {"accountSid": ACCOUNT, "callSid": CALL},
    "streamSid": STREAM,
}
MARK = {"event": "mark", "sequenceNumber": "4", "streamSid": STREAM, "mark": {"name": "my label"}}
DTMF = {
    "event": "dtmf",
    "streamSid": STREAM,
    "sequenceNumber": "5",
    "dtmf": {"track": "inbound_track", "digit": "1"},
}


def with_fields(message: dict[str, Any], path: str, value: Any) -> str:
    """A copy of ``message`` as JSON with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    copy = json.loads(json.dumps(message))
    *parents, last = path.split(".")
    node = copy
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return json.dumps(copy)


CODES = {
    "INVALID_JSON",
    "UNKNOWN_EVENT",
    "MISSING_FIELD",
    "BAD_FIELD",
    "BAD_PAYLOAD",
    "UNSUPPORTED_MEDIA_FORMAT",
}


def parse_error(text: str) -> TwilioInputError:
    """The error ``parse_twilio_message`` raises for ``text``."""
    with pytest.raises(TwilioInputError) as info:
        parse_twilio_message(text)
    return info.value


# --------------------------------------------------------------------------------------------------
# Documented shapes


def test_connected_message_parses() -> None:
    """The documented connected message gives its protocol and version."""
    assert parse_twilio_message(json.dumps(CONNECTED)) == TwilioConnected(protocol="Call", version="1.0.0")


def test_start_message_parses() -> None:
    """The documented start message gives the SIDs, the track, the media format and the parameters."""
    start = parse_twilio_message(json.dumps(START))
    assert isinstance(start, TwilioStart)
    assert (start.stream_sid, start.call_sid, start.account_sid) == (STREAM, CALL, ACCOUNT)
    assert start.tracks == ("inbound",)
    assert (start.encoding, start.sample_rate_hz, start.channels) == ("audio/x-mulaw", 8000, 1)
    assert dict(start.custom_parameters) == {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"}
    assert start.sequence_number == 1


def test_start_custom_parameters_are_read_only() -> None:
    """A parsed start's custom parameters cannot be changed afterwards."""
    start = parse_twilio_message(json.dumps(START))
    assert isinstance(start, TwilioStart)
    with pytest.raises(TypeError):
        start.custom_parameters["language"] = "en"  # type: ignore[index]


def test_start_with_both_tracks_parses() -> None:
    """A both_tracks stream's start lists inbound and outbound."""
    start = parse_twilio_message(with_fields(START, "start.tracks", ["inbound", "outbound"]))
    assert isinstance(start, TwilioStart)
    assert start.tracks == ("inbound", "outbound")


def test_start_media_format_numbers_may_be_strings() -> None:
    """sampleRate and channels are accepted as decimal strings as well as integers."""
    text = with_fields(
        START, "start.mediaFormat", {"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": "1"}
    )
    start = parse_twilio_message(text)
    assert isinstance(start, TwilioStart)
    assert (start.sample_rate_hz, start.channels) == (8000, 1)


def test_start_without_custom_parameters_has_none() -> None:
    """A start without customParameters gives an empty mapping."""
    start = parse_twilio_message(with_fields(START, "start.customParameters", ...))
    assert isinstance(start, TwilioStart)
    assert dict(start.custom_parameters) == {}


def test_start_stream_sid_falls_back_to_top_level() -> None:
    """A start whose start object lacks streamSid takes the top-level one."""
    start = parse_twilio_message(with_fields(START, "start.streamSid", ...))
    assert isinstance(start, TwilioStart)
    assert start.stream_sid == STREAM


def test_media_message_parses_numeric_strings() -> None:
    """The documented media message, with its numbers as strings, gives ints and the decoded payload."""
    media = parse_twilio_message(json.dumps(MEDIA))
    assert media == TwilioMedia(track="outbound", chunk=1, timestamp_ms=5, payload=PAYLOAD, sequence_number=3)


def test_media_message_accepts_integers() -> None:
    """Numbers sent as JSON integers parse the same as strings."""
    message = json.loads(json.dumps(MEDIA))
    message["sequenceNumber"] = 3
    message["media"].update(chunk=1, timestamp=5)
    assert parse_twilio_message(json.dumps(message)) == parse_twilio_message(json.dumps(MEDIA))


def test_media_track_accepts_twiml_spelling() -> None:
    """A track spelled as in TwiML (inbound_track) is the inbound track."""
    media = parse_twilio_message(with_fields(MEDIA, "media.track", "inbound_track"))
    assert isinstance(media, TwilioMedia)
    assert media.track == "inbound"


def test_media_with_empty_payload_parses() -> None:
    """An empty payload decodes to no bytes."""
    media = parse_twilio_message(with_fields(MEDIA, "media.payload", ""))
    assert isinstance(media, TwilioMedia)
    assert media.payload == b""


def test_media_without_sequence_number_parses() -> None:
    """sequenceNumber is optional: None when absent."""
    media = parse_twilio_message(with_fields(MEDIA, "sequenceNumber", ...))
    assert isinstance(media, TwilioMedia)
    assert media.sequence_number is None


def test_stop_message_parses() -> None:
    """The documented stop message gives its SIDs and sequence number."""
    assert parse_twilio_message(json.dumps(STOP)) == TwilioStop(
        stream_sid=STREAM, account_sid=ACCOUNT, call_sid=CALL, sequence_number=5
    )


def test_bare_stop_still_parses() -> None:
    """A stop with nothing but its event still ends the stream."""
    assert parse_twilio_message('{"event": "stop"}') == TwilioStop()


def test_mark_message_parses() -> None:
    """The documented mark message gives its name."""
    assert parse_twilio_message(json.dumps(MARK)) == TwilioMark(
        name="my label", stream_sid=STREAM, sequence_number=4
    )


def test_dtmf_message_parses() -> None:
    """The documented dtmf message gives its digit and track as sent."""
    assert parse_twilio_message(json.dumps(DTMF)) == TwilioDtmf(
        digit="1", track="inbound_track", stream_sid=STREAM, sequence_number=5
    )


def test_connected_without_fields_parses() -> None:
    """A connected message without protocol or version still parses."""
    assert parse_twilio_message('{"event": "connected"}') == TwilioConnected()


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (CONNECTED, "extra"),
        (START, "start.extra"),
        (START, "start.mediaFormat.bitDepth"),
        (MEDIA, "media.extra"),
        (MEDIA, "extra"),
        (STOP, "stop.extra"),
        (MARK, "mark.extra"),
        (DTMF, "dtmf.extra"),
    ],
)
def test_extra_fields_are_ignored(message: dict[str, Any], path: str) -> None:
    """A field Twilio may add later changes nothing in the parsed message."""
    assert parse_twilio_message(with_fields(message, path, {"new": [1, "x"]})) == parse_twilio_message(
        json.dumps(message)
    )


# --------------------------------------------------------------------------------------------------
# Errors


def test_input_error_is_a_protocol_violation() -> None:
    """TwilioInputError sits in the package's ClientError hierarchy with its code and description."""
    error = parse_error("nope")
    assert isinstance(error, ProtocolViolation) and isinstance(error, ClientError)
    assert error.code == "INVALID_JSON" and error.description.endswith(".")


@pytest.mark.parametrize("text", ["", "nope", "{", "[1, 2]", '"media"', "null", "1" * 5000, "[" * 100_000])
def test_invalid_json(text: str) -> None:
    """Text that is not a JSON object is INVALID_JSON, without a close code."""
    error = parse_error(text)
    assert error.code == "INVALID_JSON"
    assert error.close_code is None


def test_unknown_event_names_it() -> None:
    """An event this server does not know is UNKNOWN_EVENT, naming it and the known ones."""
    error = parse_error('{"event": "clear", "streamSid": "MZ1"}')
    assert error.code == "UNKNOWN_EVENT"
    assert "'clear'" in error.description
    assert all(name in error.description for name in EVENTS)


@pytest.mark.parametrize(
    ("message", "path", "name"),
    [
        (MEDIA, "event", "event"),
        (MEDIA, "media", "media"),
        (MEDIA, "media.track", "media.track"),
        (MEDIA, "media.chunk", "media.chunk"),
        (MEDIA, "media.timestamp", "media.timestamp"),
        (MEDIA, "media.payload", "media.payload"),
        (START, "start", "start"),
        (START, "start.callSid", "start.callSid"),
        (START, "start.accountSid", "start.accountSid"),
        (START, "start.tracks", "start.tracks"),
        (START, "start.mediaFormat", "start.mediaFormat"),
        (START, "start.mediaFormat.encoding", "start.mediaFormat.encoding"),
        (START, "start.mediaFormat.sampleRate", "start.mediaFormat.sampleRate"),
        (START, "start.mediaFormat.channels", "start.mediaFormat.channels"),
        (MARK, "mark.name", "mark.name"),
        (DTMF, "dtmf.digit", "dtmf.digit"),
    ],
)
def test_missing_field_names_it(message: dict[str, Any], path: str, name: str) -> None:
    """A required field that is absent is MISSING_FIELD, naming the field."""
    error = parse_error(with_fields(message, path, ...))
    assert error.code == "MISSING_FIELD"
    assert name in error.description


def test_start_without_any_stream_sid_is_missing_field() -> None:
    """A start with streamSid in neither place is MISSING_FIELD."""
    message = json.loads(with_fields(START, "start.streamSid", ...))
    del message["streamSid"]
    error = parse_error(json.dumps(message))
    assert error.code == "MISSING_FIELD" and "streamSid" in error.description


@pytest.mark.parametrize(
    ("message", "path", "value", "name"),
    [
        (MEDIA, "media.timestamp", "abc", "media.timestamp"),
        (MEDIA, "media.timestamp", "-5", "media.timestamp"),
        (MEDIA, "media.timestamp", "1.5", "media.timestamp"),
        (MEDIA, "media.timestamp", " 5", "media.timestamp"),
        (MEDIA, "media.timestamp", "\u0665", "media.timestamp"),  # an Arabic-Indic five
        (MEDIA, "media.timestamp", 1.5, "media.timestamp"),
        (MEDIA, "media.timestamp", -1, "media.timestamp"),
        (MEDIA, "media.timestamp", True, "media.timestamp"),
        (MEDIA, "media.timestamp", None, "media.timestamp"),
        (MEDIA, "media.timestamp", 2**53, "media.timestamp"),
        (MEDIA, "media.timestamp", "9" * 17, "media.timestamp"),
        (MEDIA, "media.chunk", "one", "media.chunk"),
        (MEDIA, "sequenceNumber", "x", "sequenceNumber"),
        (MEDIA, "media.track", "both_tracks", "media.track"),
        (MEDIA, "media.track", 0, "media.track"),
        (MEDIA, "media", "payload", "media"),
        (MEDIA, "event", 7, "event"),
        (START, "start.tracks", [], "start.tracks"),
        (START, "start.tracks", "inbound", "start.tracks"),
        (START, "start.tracks", ["inbound", 1], "start.tracks"),
        (START, "start.tracks", ["sideways"], "start.tracks"),
        (START, "start.mediaFormat.sampleRate", "fast", "start.mediaFormat.sampleRate"),
        (START, "start.customParameters", ["language"], "start.customParameters"),
        (START, "start.customParameters", {"endpointing": 300}, "start.customParameters"),
        (START, "start.callSid", 12, "start.callSid"),
        (STOP, "stop", "now", "stop"),
        (STOP, "stop.callSid", 5, "stop.callSid"),
        (MARK, "mark.name", None, "mark.name"),
        (DTMF, "dtmf", [], "dtmf"),
    ],
)
def test_bad_field_names_it(message: dict[str, Any], path: str, value: Any, name: str) -> None:
    """A field with the wrong type or value is BAD_FIELD, naming the field."""
    error = parse_error(with_fields(message, path, value))
    assert error.code == "BAD_FIELD"
    assert name in error.description


@pytest.mark.parametrize("payload", ["***", "abc", "YWJj\n", "é", 123, None, ["YQ=="]])
def test_bad_payload(payload: Any) -> None:
    """A payload that is not a base64 string is BAD_PAYLOAD, without a close code."""
    error = parse_error(with_fields(MEDIA, "media.payload", payload))
    assert error.code == "BAD_PAYLOAD"
    assert error.close_code is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("encoding", "audio/l16"),
        ("encoding", "audio/x-alaw"),
        ("sampleRate", 16000),
        ("sampleRate", "24000"),
        ("channels", 2),
    ],
)
def test_unsupported_media_format_closes_with_1003(field: str, value: Any) -> None:
    """Anything but mu-law 8000 Hz mono is UNSUPPORTED_MEDIA_FORMAT, closing the stream with 1003."""
    error = parse_error(with_fields(START, f"start.mediaFormat.{field}", value))
    assert error.code == "UNSUPPORTED_MEDIA_FORMAT"
    assert error.close_code is CloseCode.UNSUPPORTED_DATA
    assert "audio/x-mulaw" in error.description


def test_encoding_is_case_insensitive() -> None:
    """A MIME type differing only in case is the supported encoding."""
    start = parse_twilio_message(with_fields(START, "start.mediaFormat.encoding", "Audio/X-Mulaw"))
    assert isinstance(start, TwilioStart)
    assert start.encoding == "audio/x-mulaw"


def test_bad_start_closes_with_1002() -> None:
    """A start that cannot be used for another reason closes the stream with 1002."""
    error = parse_error(with_fields(START, "start.callSid", ...))
    assert error.code == "MISSING_FIELD"
    assert error.close_code is CloseCode.PROTOCOL_ERROR


def test_bad_media_does_not_close() -> None:
    """A bad media message carries no close code: the stream can skip it."""
    assert parse_error(with_fields(MEDIA, "media.timestamp", "x")).close_code is None


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (MEDIA, "event"),
        (MEDIA, "media.timestamp"),
        (MEDIA, "media.track"),
        (MEDIA, "media.payload"),
        (START, "start.mediaFormat.encoding"),
        (START, "start.tracks"),
    ],
)
def test_errors_quote_at_most_40_characters(message: dict[str, Any], path: str) -> None:
    """A description quotes no more than 40 characters of what the client sent."""
    value: Any = "Z" * 501  # not a multiple of 4: not base64 either
    if path == "start.tracks":
        value = [value]
    description = parse_error(with_fields(message, path, value)).description
    assert "Z" * 40 in description
    assert "Z" * 41 not in description


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_random_text(text: str) -> None:
    """Random text parses or raises TwilioInputError, nothing else."""
    with contextlib.suppress(TwilioInputError):
        parse_twilio_message(text)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
DOCUMENTED = [CONNECTED, START, MEDIA, STOP, MARK, DTMF]


def paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted path to a value inside a JSON object."""
    found = []
    for key, value in node.items():
        found.append(prefix + key)
        if isinstance(value, dict):
            found.extend(paths(value, prefix + key + "."))
    return found


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(DOCUMENTED), st.data(), st.one_of(st.just(...), _json_values))
def test_fuzz_mutated_documented_messages(message: dict[str, Any], data: st.DataObject, value: Any) -> None:
    """A documented message with any one field deleted or replaced parses or raises TwilioInputError."""
    path = data.draw(st.sampled_from(paths(message)))
    try:
        parsed = parse_twilio_message(with_fields(message, path, value))
    except TwilioInputError as error:
        assert error.code in CODES
        assert len(error.description) < 400
    else:
        assert isinstance(
            parsed, (TwilioConnected, TwilioStart, TwilioMedia, TwilioStop, TwilioMark, TwilioDtmf)
        )


# --------------------------------------------------------------------------------------------------
# TrackTimeline


def chunk(ms: int, byte: int = 0x10) -> bytes:
    """``ms`` milliseconds of one non-silent mu-law byte."""
    return bytes([byte]) * (ms * BYTES_PER_MS)


def test_contiguous_chunks_pass_through() -> None:
    """Chunks whose timestamps follow on from each other are fed unchanged."""
    timeline = TrackTimeline()
    out = [timeline.place(ts, chunk(20, 0x10 + i)) for i, ts in enumerate(range(0, 100, 20))]
    assert out == [chunk(20, 0x10 + i) for i in range(5)]
    assert (timeline.gap_ms_filled, timeline.overlap_ms_dropped, timeline.jumps) == (0, 0, 0)
    assert timeline.bytes_fed == 5 * 160
    assert timeline.position_ms == 100


def test_leading_gap_is_filled() -> None:
    """A first chunk at 5 ms is fed after 5 ms of mu-law silence, on the stream's clock."""
    timeline = TrackTimeline()
    assert timeline.place(5, chunk(20)) == MULAW_SILENCE * 40 + chunk(20)
    assert timeline.gap_ms_filled == 5
    assert timeline.position_ms == 25


def test_lost_chunk_becomes_silence_of_its_length() -> None:
    """A chunk missing between 20 and 40 ms becomes 20 ms (160 bytes) of 0xFF."""
    timeline = TrackTimeline()
    timeline.place(0, chunk(20))
    assert timeline.place(40, chunk(20, 0x22)) == b"\xff" * 160 + chunk(20, 0x22)
    assert timeline.gap_ms_filled == 20
    assert timeline.bytes_fed == 3 * 160


def test_gaps_follow_timestamp_not_chunk_size() -> None:
    """A 10 ms chunk followed by one stamped 20 ms later gets a 10 ms gap, from its timestamp."""
    timeline = TrackTimeline()
    timeline.place(0, chunk(10))
    assert timeline.place(20, chunk(20)) == MULAW_SILENCE * 80 + chunk(20)
    assert timeline.gap_ms_filled == 10


def test_duplicate_chunk_feeds_nothing() -> None:
    """A chunk repeated with the same timestamp returns no bytes and counts as overlap."""
    timeline = TrackTimeline()
    timeline.place(0, chunk(20))
    timeline.place(20, chunk(20))
    assert timeline.place(20, chunk(20)) == b""
    assert timeline.overlap_ms_dropped == 20
    assert timeline.bytes_fed == 320


def test_late_chunk_feeds_nothing() -> None:
    """A chunk arriving after later audio (its time already filled with silence) returns no bytes."""
    timeline = TrackTimeline()
    timeline.place(0, chunk(20))
    timeline.place(40, chunk(20))
    assert timeline.place(20, chunk(20, 0x33)) == b""
    assert timeline.overlap_ms_dropped == 20
    assert timeline.position_ms == 60


def test_partial_overlap_feeds_only_the_new_tail() -> None:
    """A chunk overlapping the fed audio by 10 ms returns only its last 10 ms."""
    timeline = TrackTimeline()
    timeline.place(0, chunk(20))
    payload = chunk(10, 0x41) + chunk(10, 0x42)
    assert timeline.place(10, payload) == chunk(10, 0x42)
    assert timeline.overlap_ms_dropped == 10
    assert timeline.position_ms == 30


def test_gap_of_exactly_max_gap_ms_is_filled() -> None:
    """A gap of max_gap_ms is filled in full and is not a jump."""
    timeline = TrackTimeline(max_gap_ms=100)
    timeline.place(0, chunk(20))
    assert timeline.place(120, b"") == MULAW_SILENCE * 800
    assert (timeline.gap_ms_filled, timeline.jumps) == (100, 0)


def test_clock_jump_is_bounded() -> None:
    """A gap beyond max_gap_ms feeds only max_gap_ms of silence, counts a jump, and carries on."""
    timeline = TrackTimeline()
    timeline.place(0, chunk(20))
    out = timeline.place(3_600_000, chunk(20, 0x55))
    assert out == MULAW_SILENCE * (10_000 * BYTES_PER_MS) + chunk(20, 0x55)
    assert timeline.jumps == 1
    assert timeline.gap_ms_filled == 10_000
    assert timeline.place(3_600_020, chunk(20)) == chunk(20)
    assert timeline.position_ms == 3_600_040


def test_leading_jump_is_bounded() -> None:
    """A first chunk far from the stream's start is a jump like any other gap."""
    timeline = TrackTimeline(max_gap_ms=50)
    assert timeline.place(60_000, chunk(20)) == MULAW_SILENCE * 400 + chunk(20)
    assert timeline.jumps == 1


def test_max_gap_zero_fills_nothing() -> None:
    """With max_gap_ms=0 every gap is a jump and no silence is fed."""
    timeline = TrackTimeline(max_gap_ms=0)
    assert timeline.place(40, chunk(20)) == chunk(20)
    assert (timeline.jumps, timeline.gap_ms_filled) == (1, 0)


def test_timeline_refuses_negative_values() -> None:
    """A negative max_gap_ms or timestamp is a ValueError."""
    with pytest.raises(ValueError, match="max_gap_ms"):
        TrackTimeline(max_gap_ms=-1)
    with pytest.raises(ValueError, match="timestamp_ms"):
        TrackTimeline().place(-1, b"")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 200_000), st.integers(0, 400)), max_size=40),
    st.integers(0, 20_000),
)
def test_timeline_accounting(chunks: list[tuple[int, int]], max_gap_ms: int) -> None:
    """Fed bytes are received plus filled silence minus dropped overlap; no call exceeds its bound."""
    timeline = TrackTimeline(max_gap_ms=max_gap_ms)
    total = received = 0
    for timestamp_ms, size in chunks:
        out = timeline.place(timestamp_ms, b"\x01" * size)
        assert len(out) <= size + max_gap_ms * BYTES_PER_MS
        total += len(out)
        received += size
    assert timeline.bytes_fed == total
    gap_bytes = timeline.gap_ms_filled * BYTES_PER_MS
    assert total == received + gap_bytes - timeline.overlap_ms_dropped * BYTES_PER_MS
    assert timeline.position_ms * BYTES_PER_MS >= total


# --------------------------------------------------------------------------------------------------
# Channels


def test_track_channels() -> None:
    """The caller is channel 0 and the far side channel 1."""
    assert dict(TRACK_CHANNELS) == {"inbound": 0, "outbound": 1}


@pytest.mark.parametrize(
    ("tracks", "channels"),
    [(("inbound",), 1), (("inbound", "outbound"), 2), (("outbound", "inbound"), 2), (("outbound",), 2)],
)
def test_channels_for_tracks(tracks: tuple[str, ...], channels: int) -> None:
    """Inbound alone is one channel; with outbound it is two, in either order."""
    assert channels_for_tracks(tracks) == channels


def test_channels_for_parsed_start() -> None:
    """A both_tracks start parsed from JSON needs two channels."""
    start = parse_twilio_message(with_fields(START, "start.tracks", ["inbound_track", "outbound_track"]))
    assert isinstance(start, TwilioStart)
    assert channels_for_tracks(start.tracks) == 2


@pytest.mark.parametrize("tracks", [(), ("both",)])
def test_channels_for_bad_tracks(tracks: tuple[str, ...]) -> None:
    """No tracks, or an unknown one, is a ValueError."""
    with pytest.raises(ValueError):
        channels_for_tracks(tracks)


# --------------------------------------------------------------------------------------------------
# Signatures


def sign(url: str, token: str = TOKEN) -> str:
    """The signature Twilio would send for a WebSocket upgrade to ``url``."""
    return str(RequestValidator(token).compute_signature(url, {}))


def test_signature_valid() -> None:
    """Twilio's signature of the wss URL validates."""
    assert twilio_signature_valid(TOKEN, PUBLIC_WSS, sign(PUBLIC_WSS))


@pytest.mark.parametrize(
    "signature",
    [
        sign(PUBLIC_WSS, token="x" * 32),
        sign("https://calls.example.com/v1/twilio"),
        sign("wss://calls.example.com/v1/twilio/"),
        sign("wss://other.example.com/v1/twilio"),
        "not-a-signature",
    ],
)
def test_signature_invalid(signature: str) -> None:
    """A signature of another token, scheme, path or host does not validate."""
    assert not twilio_signature_valid(TOKEN, PUBLIC_WSS, signature)


@pytest.mark.parametrize("signature", [None, ""])
def test_signature_missing(signature: str | None) -> None:
    """No signature, or an empty one, does not validate."""
    assert not twilio_signature_valid(TOKEN, PUBLIC_WSS, signature)


def test_signature_with_empty_token_fails() -> None:
    """An empty auth token validates nothing, even a signature made with it."""
    assert not twilio_signature_valid("", PUBLIC_WSS, sign(PUBLIC_WSS, token=""))


def test_signature_signed_with_port_validates_without() -> None:
    """A signature over wss://host:443/... validates against the URL without a port."""
    assert twilio_signature_valid(TOKEN, PUBLIC_WSS, sign("wss://calls.example.com:443/v1/twilio"))


def test_signature_signed_without_port_validates_with() -> None:
    """A signature over the URL without a port validates against wss://host:443/...."""
    assert twilio_signature_valid(TOKEN, "wss://calls.example.com:443/v1/twilio", sign(PUBLIC_WSS))


def test_signature_with_another_port_fails() -> None:
    """A signature over a different explicit port does not validate against the URL without one."""
    assert not twilio_signature_valid(TOKEN, PUBLIC_WSS, sign("wss://calls.example.com:8443/v1/twilio"))


@pytest.mark.parametrize(
    "url",
    ["wss://calls.example.com:abc/v1/twilio", "wss://calls.example.com:99999/v1/twilio", "wss://[::1/v1"],
)
def test_signature_with_malformed_url_fails(url: str) -> None:
    """A URL whose host or port is malformed is rejected without an exception."""
    assert not twilio_signature_valid(TOKEN, url, sign(url))


# --------------------------------------------------------------------------------------------------
# signed_url


def test_signed_url_from_the_request() -> None:
    """Without a proxy the request's own scheme and host give the URL, http as ws and https as wss."""
    none: dict[str, str | None] = {"forwarded_proto": None, "forwarded_host": None, "public_url": None}
    assert signed_url("http", "10.0.0.5:8000", "/v1/twilio", **none) == "ws://10.0.0.5:8000/v1/twilio"
    assert signed_url("https", "calls.example.com", "/v1/twilio", **none) == PUBLIC_WSS


def test_signed_url_from_forwarded_headers() -> None:
    """A trusted proxy's X-Forwarded-Proto and X-Forwarded-Host replace the inner scheme and host."""
    url = signed_url(
        "http",
        "10.0.0.5:8000",
        "/v1/twilio",
        forwarded_proto="https",
        forwarded_host="calls.example.com",
        public_url=None,
    )
    assert url == PUBLIC_WSS


def test_signed_url_forwarded_proto_alone() -> None:
    """X-Forwarded-Proto alone changes the scheme and keeps the request's host."""
    url = signed_url(
        "http",
        "calls.example.com",
        "/v1/twilio",
        forwarded_proto="https",
        forwarded_host=None,
        public_url=None,
    )
    assert url == PUBLIC_WSS


def test_signed_url_forwarded_lists_take_the_first_hop() -> None:
    """Comma-separated forwarded headers use their first value, the hop Twilio reached."""
    url = signed_url(
        "http",
        "10.0.0.5:8000",
        "/v1/twilio",
        forwarded_proto="https, http",
        forwarded_host="calls.example.com, lb.internal",
        public_url=None,
    )
    assert url == PUBLIC_WSS


def test_signed_url_public_url_wins() -> None:
    """--public-url takes precedence over forwarded headers and the request."""
    url = signed_url(
        "http",
        "10.0.0.5:8000",
        "/v1/twilio",
        forwarded_proto="http",
        forwarded_host="evil.example.net",
        public_url="https://calls.example.com",
    )
    assert url == PUBLIC_WSS


@pytest.mark.parametrize(
    ("public_url", "expected"),
    [
        ("https://calls.example.com/", PUBLIC_WSS),
        ("https://example.com/stt", "wss://example.com/stt/v1/twilio"),
        ("https://example.com/stt/", "wss://example.com/stt/v1/twilio"),
        ("http://localhost:8000", "ws://localhost:8000/v1/twilio"),
        ("wss://calls.example.com", PUBLIC_WSS),
    ],
)
def test_signed_url_public_url_forms(public_url: str, expected: str) -> None:
    """A public URL's path is a prefix, a trailing slash does not double, and its port is kept."""
    url = signed_url(
        "http", "10.0.0.5", "/v1/twilio", forwarded_proto=None, forwarded_host=None, public_url=public_url
    )
    assert url == expected


@pytest.mark.parametrize(
    ("scheme", "public_url"),
    [("ftp", None), ("http", "calls.example.com"), ("http", "gopher://calls.example.com")],
)
def test_signed_url_refuses_bad_input(scheme: str, public_url: str | None) -> None:
    """An unknown scheme or a public URL without a host is a ValueError."""
    with pytest.raises(ValueError):
        signed_url(
            scheme, "h", "/v1/twilio", forwarded_proto=None, forwarded_host=None, public_url=public_url
        )


def test_signature_behind_tls_proxy() -> None:
    """Behind a TLS-terminating proxy the signature validates against signed_url, not the inner URL."""
    signature = sign(PUBLIC_WSS)
    inner = signed_url(
        "http", "10.0.0.5:8000", "/v1/twilio", forwarded_proto=None, forwarded_host=None, public_url=None
    )
    rebuilt = signed_url(
        "http",
        "10.0.0.5:8000",
        "/v1/twilio",
        forwarded_proto="https",
        forwarded_host="calls.example.com",
        public_url=None,
    )
    assert not twilio_signature_valid(TOKEN, inner, signature)
    assert twilio_signature_valid(TOKEN, rebuilt, signature)


# --------------------------------------------------------------------------------------------------
# docs/twilio.md


@pytest.mark.parametrize("doc", [DOC, DOC.parent.parent / "README.md"], ids=["docs/twilio.md", "README.md"])
def test_doc_twiml_is_what_the_package_emits(doc: Path) -> None:
    """The TwiML in docs/twilio.md and the README is exactly what twilio's VoiceResponse builds for the
    documented stream."""
    response = VoiceResponse()
    stream = response.start().stream(url=PUBLIC_WSS, track="both_tracks")
    stream.parameter(name="language", value="en")
    assert str(response) in doc.read_text(encoding="utf-8").splitlines()


def test_doc_python_example_prints_the_doc_twiml() -> None:
    """The Python example in docs/twilio.md prints the XML block shown above it."""
    text = DOC.read_text(encoding="utf-8")
    xml = re.search(r"```xml\n(.*?)\n```", text, re.S)
    code = re.search(r"```python\n(.*?)\n```", text, re.S)
    assert xml is not None and code is not None
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.group(1), {})  # the doc's own example, run as a reader would
    assert printed.getvalue().strip() == xml.group(1)


@pytest.mark.parametrize(
    "needle",
    [
        "--twilio-auth-token",
        "403",
        "--public-url",
        "--trusted-proxies",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "--webhook-allowed-hosts",
        "`language`",
        "`endpointing`",
        "`interim_results`",
        "`utterance_end_ms`",
        "`webhook_url`",
        "`punctuate`",
        "binary frame",
    ],
)
def test_doc_covers(needle: str) -> None:
    """docs/twilio.md documents each flag, status and custom parameter the server relies on."""
    assert needle in DOC.read_text(encoding="utf-8")
