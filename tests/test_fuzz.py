"""Fuzz: random bytes, random text and random query strings either work or give a documented error."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_server.errors import BadRequest, ClientError
from stream_server.protocol import KNOWN_PARAMS, parse_client_message, parse_options, serialize
from stream_server.session import JobKind

from .synth import Driver, make_session

PROTOCOL_DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
DOCUMENTED_CODES = set(re.findall(r"`([A-Z][A-Z_]+)`", PROTOCOL_DOC))

control = st.sampled_from(['{"type":"KeepAlive"}', '{"type":"Finalize"}', '{"type":"CloseStream"}'])
junk_text = st.one_of(
    st.text(max_size=200),
    st.builds(
        json.dumps, st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=4)
    ),
    st.builds(lambda t: json.dumps({"type": t}), st.text(max_size=20)),
)
message = st.one_of(
    st.tuples(st.just("audio"), st.binary(max_size=4000)),
    st.tuples(st.just("text"), control | junk_text),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(message, max_size=40))
def test_random_message_sequences_never_break_the_session(messages: list[tuple[str, object]]) -> None:
    """Any sequence of binary and text frames is handled without raising; every error code is documented,
    every event serializes, and every final job is answered exactly once."""
    d = Driver(make_session(max_client_errors=1000))
    for kind, payload in messages:
        if kind == "audio":
            assert isinstance(payload, bytes)
            d.session.receive_audio(payload)
        else:
            assert isinstance(payload, str)
            d.session.receive_text(payload)
        d.pump()
    d.session.receive_text('{"type":"CloseStream"}')
    d.pump()
    for event in d.events:
        body = json.loads(serialize(event))
        if body["type"] == "Error":
            assert body["code"] in DOCUMENTED_CODES, body["code"]
            assert body["code"] != "INTERNAL_ERROR"
    final_jobs = [j for j in d.jobs if j.kind is JobKind.FINAL]
    final_segments = [e["segment_id"] for e in d.finals() if e["segment_id"]]  # 0: a Finalize acknowledgement
    assert sorted(final_segments) == sorted(j.segment_id for j in final_jobs), "one final per segment"
    assert d.session.close is not None


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(KNOWN_PARAMS | {"model", "bogus", "token"})),
        st.lists(st.text(max_size=12), min_size=1, max_size=2),
        max_size=6,
    )
)
def test_random_query_strings_parse_or_give_documented_400(query: dict[str, list[str]]) -> None:
    """Random query parameters give valid options or a BadRequest with a documented code."""
    try:
        options = parse_options(query)
    except BadRequest as exc:
        assert exc.code in DOCUMENTED_CODES, exc.code
        assert exc.description
    else:
        assert 8000 <= options.sample_rate_hz <= 48000 and options.channels == 1


@settings(max_examples=300, deadline=None)
@given(junk_text)
def test_random_text_parses_or_gives_documented_error(text: str) -> None:
    """Random text frames parse as a control message or raise a ClientError with a documented code."""
    try:
        parse_client_message(text)
    except ClientError as exc:
        assert exc.code in DOCUMENTED_CODES and exc.close_code is None


def test_every_error_code_in_the_source_is_documented() -> None:
    """Each error code the server can send appears in docs/protocol.md."""
    root = Path(__file__).resolve().parents[1] / "stream_server"
    source = "\n".join(p.read_text() for p in root.rglob("*.py"))
    pattern = r'(?:ProtocolViolation|BadRequest|Error|_json_error)\(\s*(?:\d+,\s*)?"([A-Z][A-Z_]+)"'
    codes = set(re.findall(pattern, source))
    codes |= set(re.findall(r'receive_failure\(\s*[\w.]+,\s*"([A-Z][A-Z_]+)"', source))
    assert len(codes) > 20, codes
    assert codes <= DOCUMENTED_CODES, codes - DOCUMENTED_CODES
