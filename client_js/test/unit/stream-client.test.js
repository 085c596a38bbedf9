// Unit tests of LiveTranscriber against a scripted fake WebSocket and a fake source (node --test):
// the query it sends, KeepAlive, CloseStream on stop, reconnect with backoff, replay and time offsets,
// fatal errors and giving up.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { LiveTranscriber, healthUrlFor, defaultListenUrl } from '../../stream-client.js';

const URL_ = 'ws://127.0.0.1:9/v1/listen';
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolves when `predicate()` holds, polling; fails after `ms`. */
async function until(predicate, ms = 2000, what = 'condition') {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

function fakeSocketClass() {
  class FakeSocket {
    static instances = [];
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      FakeSocket.instances.push(this);
    }
    send(data) {
      if (this.readyState !== 1) throw new Error('send on a socket that is not open');
      const message = typeof data === 'string' ? JSON.parse(data) : Int16Array.from(data);
      this.sent.push(message);
      // Like the server: CloseStream is answered with a close, unless a test scripts it.
      if (message.type === 'CloseStream' && !this.manualClose) setTimeout(() => this.serverClose(1000, 'CloseStream'), 1);
    }
    close(code = 1000, reason = '') {
      if (this.readyState >= 2) return;
      this.readyState = 2;
      setTimeout(() => this.serverClose(code, reason), 1);
    }
    // --- what the "server" does
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    message(payload) {
      this.onmessage?.({ data: JSON.stringify(payload) });
    }
    serverClose(code, reason = '') {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }
    fail() {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: '', wasClean: false });
    }
    audio() {
      return this.sent.filter((m) => m instanceof Int16Array);
    }
    texts() {
      return this.sent.filter((m) => !(m instanceof Int16Array));
    }
  }
  return FakeSocket;
}

class FakeSource {
  constructor() {
    this.stopped = false;
    this.paused = false;
    this.next = 0;
  }
  async start(sink) {
    this.sink = sink;
  }
  async stop() {
    this.stopped = true;
  }
  pause() {
    this.paused = true;
  }
  resume() {
    this.paused = false;
  }
  /** Push `count` frames; each sample holds its frame's number so replays can be traced. */
  push(count = 1, samples = 800) {
    for (let i = 0; i < count; i++) this.sink.onFrame(new Int16Array(samples).fill(this.next++));
  }
}

function results({ start, duration, text, isFinal = true, language = 'en', emotion = null }) {
  return {
    type: 'Results',
    start,
    duration,
    is_final: isFinal,
    speech_final: isFinal,
    from_finalize: false,
    channel: { alternatives: [{ transcript: text, confidence: 0.9, words: [{ word: 'w', punctuated_word: 'w', start, end: start + duration, confidence: 0.9 }] }] },
    tags: { language, emotion, audio_event: null },
  };
}

function setup(options = {}) {
  const Socket = fakeSocketClass();
  const events = [];
  const t = new LiveTranscriber({
    url: URL_,
    WebSocket: Socket,
    fetch: async () => {
      throw new TypeError('fetch failed');
    },
    backoffBaseMs: 10,
    backoffMaxMs: 40,
    backoffJitter: 0,
    ...options,
  });
  for (const type of ['state', 'open', 'interim', 'final', 'latency', 'error', 'close', 'end', 'gap', 'metadata']) {
    t.addEventListener(type, (e) => events.push({ type, ...e.detail }));
  }
  const source = new FakeSource();
  const of = (type) => events.filter((e) => e.type === type);
  return { t, Socket, events, of, source };
}

describe('LiveTranscriber', () => {
  it('derives the /v1/listen and /health URLs from a page address', () => {
    assert.equal(defaultListenUrl('https://captions.example/room/index?x=1'), 'wss://captions.example/room/v1/listen');
    assert.equal(defaultListenUrl('http://127.0.0.1:8000/'), 'ws://127.0.0.1:8000/v1/listen');
    assert.equal(healthUrlFor('wss://h.example/room/v1/listen?a=1'), 'https://h.example/room/health');
  });

  it('opens /v1/listen with the linear16 16 kHz query and the params, the token as the bearer subprotocol, then streams frames', async () => {
    const { t, Socket, source } = setup({ params: { language: 'en', utterance_end_ms: 1000 }, getToken: async () => 'secret' });
    await t.start(source);
    source.push(2); // captured before the socket opens: sent once it does
    await until(() => Socket.instances.length === 1);
    const ws = Socket.instances[0];
    const query = new URL(ws.url).searchParams;
    assert.equal(new URL(ws.url).pathname, '/v1/listen');
    assert.equal(query.get('encoding'), 'linear16');
    assert.equal(query.get('sample_rate'), '16000');
    assert.equal(query.get('channels'), '1');
    assert.equal(query.get('interim_results'), 'true');
    assert.equal(query.get('punctuate'), 'true');
    assert.equal(query.get('language'), 'en');
    assert.equal(query.get('utterance_end_ms'), '1000');
    assert.equal(query.get('token'), null, 'never in the URL: URLs end up in logs');
    assert.deepEqual(ws.protocols, ['bearer', 'secret']);
    ws.open();
    source.push(1);
    assert.deepEqual(
      ws.audio().map((f) => [f.length, f[0]]),
      [
        [800, 0],
        [800, 1],
        [800, 2],
      ],
    );
    assert.equal(t.state, 'open');
    await t.stop();
  });

  it('asks getToken before every connection attempt, so each reconnect carries a fresh token', async () => {
    let calls = 0;
    const { t, Socket, source } = setup({ getToken: async () => ({ access_token: `token-${++calls}` }) });
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    Socket.instances[0].open();
    Socket.instances[0].serverClose(1011, 'boom');
    await until(() => Socket.instances.length === 2, 2000, 'the reconnect');
    assert.deepEqual(
      Socket.instances.map((ws) => ws.protocols),
      [
        ['bearer', 'token-1'],
        ['bearer', 'token-2'],
      ],
    );
    Socket.instances[1].open();
    await t.stop();
  });

  it('sends an API key with authScheme token, and no subprotocol without a token', async () => {
    const keyed = setup({ token: 'k3y', authScheme: 'token' });
    await keyed.t.start(keyed.source);
    await until(() => keyed.Socket.instances.length === 1);
    assert.deepEqual(keyed.Socket.instances[0].protocols, ['token', 'k3y']);
    keyed.Socket.instances[0].open();
    await keyed.t.stop();
    const open = setup();
    await open.t.start(open.source);
    await until(() => open.Socket.instances.length === 1);
    assert.equal(open.Socket.instances[0].protocols, undefined);
    open.Socket.instances[0].open();
    await open.t.stop();
    assert.throws(() => new LiveTranscriber({ url: URL_, authScheme: 'basic' }), RangeError);
  });

  it('retries when getToken fails, and says why', async () => {
    let calls = 0;
    const { t, Socket, source, of } = setup({
      getToken: async () => {
        calls += 1;
        if (calls === 1) throw new Error('the token endpoint answered HTTP 502');
        return 'fresh';
      },
    });
    await t.start(source);
    await until(() => Socket.instances.length === 1, 2000, 'the second attempt');
    assert.deepEqual(Socket.instances[0].protocols, ['bearer', 'fresh']);
    const [error] = of('error');
    assert.equal(error.code, 'AUTH_FAILED');
    assert.match(error.message, /Could not get a token for the connection: the token endpoint answered HTTP 502/);
    assert.equal(error.willRetry, true);
    Socket.instances[0].open();
    await t.stop();
  });

  it('emits interims and finals, sends CloseStream on stop and waits for Metadata and the close', async () => {
    const { t, Socket, source, of } = setup();
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    const ws = Socket.instances[0];
    ws.manualClose = true;
    ws.open();
    source.push(40); // 2 s
    ws.message(results({ start: 0.3, duration: 0.5, text: 'good mor', isFinal: false }));
    ws.message(results({ start: 0.3, duration: 1.2, text: 'Good morning.', emotion: 'happy' }));
    assert.equal(of('interim')[0].text, 'good mor');
    assert.equal(of('final')[0].final.text, 'Good morning.');
    assert.equal(of('final')[0].final.emotion, 'happy');
    const stopping = t.stop();
    await until(() => ws.texts().some((m) => m.type === 'CloseStream'), 1000, 'CloseStream');
    assert.equal(t.state, 'closing');
    assert.ok(source.stopped);
    // The last words arrive after CloseStream, then Metadata, then the close.
    ws.message(results({ start: 1.6, duration: 0.4, text: 'Bye.' }));
    ws.message({ type: 'Metadata', request_id: 'r1', duration: 2 });
    ws.serverClose(1000, 'CloseStream');
    const { finals, metadata } = await stopping;
    assert.deepEqual(
      finals.map((f) => f.text),
      ['Good morning.', 'Bye.'],
    );
    assert.equal(metadata[0].request_id, 'r1');
    assert.equal(t.state, 'closed');
    assert.equal(of('error').length, 0);
    assert.equal(of('end').length, 1);
  });

  it('gives up waiting for the close after closeTimeoutMs and says so', async () => {
    const { t, Socket, source, of } = setup({ closeTimeoutMs: 50 });
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    Socket.instances[0].manualClose = true;
    Socket.instances[0].open();
    const started = Date.now();
    await t.stop();
    assert.ok(Date.now() - started < 1000);
    assert.equal(of('error')[0].code, 'CLOSE_TIMEOUT');
    assert.equal(t.state, 'closed');
  });

  it('sends KeepAlive while muted and drops muted audio from the timeline', async () => {
    const { t, Socket, source } = setup({ keepAliveMs: 60 });
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    const ws = Socket.instances[0];
    ws.open();
    source.push(1);
    t.pause();
    assert.ok(source.paused);
    source.push(5); // a source that keeps delivering while muted: dropped
    await sleep(250);
    const keepAlives = ws.texts().filter((m) => m.type === 'KeepAlive').length;
    assert.ok(keepAlives >= 2, `${keepAlives} KeepAlive(s)`);
    assert.equal(ws.audio().length, 1);
    t.resume();
    source.push(1);
    assert.equal(ws.audio().length, 2);
    assert.equal(t.audioSeconds, 0.1);
    await t.stop();
  });

  it('reconnects after a lost connection, resends audio that had no final, and offsets the new times', async () => {
    const { t, Socket, source, of } = setup();
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    const first = Socket.instances[0];
    first.open();
    source.push(40); // frames 0..39 = 0..2 s
    first.message(results({ start: 0.2, duration: 0.8, text: 'First words.' })); // confirms audio to 1.0 s (frame 19)
    first.fail();
    assert.equal(t.state, 'reconnecting');
    const warning = of('error').at(-1);
    assert.equal(warning.code, 'CONNECTION_LOST');
    assert.equal(warning.willRetry, true);
    assert.match(warning.message, /Reconnecting in 0\.0 s \(attempt 2 of 8\)/);
    source.push(10); // captured while disconnected: frames 40..49
    await until(() => Socket.instances.length === 2, 1000, 'the second connection');
    const second = Socket.instances[1];
    second.open();
    // Frames 20..49 go out again on the new stream, oldest first.
    assert.deepEqual(
      second.audio().map((f) => f[0]),
      Array.from({ length: 30 }, (_, i) => 20 + i),
    );
    assert.equal(of('open').at(-1).offsetSeconds, 1.0);
    assert.equal(of('open').at(-1).replayedSeconds, 1.0);
    // The new stream's clock starts at 0; the client puts it at 1.0 s on the transcript timeline.
    second.message(results({ start: 0.5, duration: 1.0, text: 'Second words.' }));
    const finals = t.finals;
    assert.deepEqual(
      finals.map((f) => [f.text, f.start, f.end]),
      [
        ['First words.', 0.2, 1.0],
        ['Second words.', 1.5, 2.5],
      ],
    );
    assert.equal(finals[1].words[0].start, 1.5);
    assert.equal(t.state, 'open');
    await t.stop();
  });

  it('backs off exponentially up to backoffMaxMs and gives up after maxAttempts with a diagnosis', async () => {
    const { t, Socket, source, of } = setup({ maxAttempts: 4 });
    await t.start(source);
    for (let n = 1; n <= 4; n++) {
      await until(() => Socket.instances.length === n, 2000, `attempt ${n}`);
      Socket.instances[n - 1].fail();
    }
    await until(() => t.state === 'failed', 2000, 'failed');
    const delays = of('state')
      .filter((e) => e.state === 'reconnecting')
      .map((e) => e.delayMs);
    assert.deepEqual(delays, [10, 20, 40]);
    const last = of('error').at(-1);
    assert.equal(last.code, 'CONNECT_FAILED');
    assert.equal(last.fatal, true);
    assert.match(last.message, /Could not connect to ws:\/\/127\.0\.0\.1:9\/v1\/listen/);
    assert.match(last.message, /not reachable/);
    assert.match(last.message, /Gave up after 4 attempts/);
    assert.ok(source.stopped);
    assert.equal(of('end').at(-1).reason, 'failed');
  });

  it('explains a refused handshake from /health when the server is up', async () => {
    const { t, Socket, source, of } = setup({
      maxAttempts: 1,
      fetch: async () => ({ ok: true, status: 200, json: async () => ({ ready: true, status: 'ready' }) }),
    });
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    Socket.instances[0].fail();
    await until(() => t.state === 'failed');
    assert.match(of('error').at(-1).message, /up but refused this stream/);
  });

  it('does not reconnect after a fatal server error, and reports its description with the close code', async () => {
    const { t, Socket, source, of } = setup();
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    const ws = Socket.instances[0];
    ws.open();
    source.push(5);
    ws.message({ type: 'Error', code: 'SESSION_TOO_LONG', description: 'This server limits a stream to 2 s of audio; open a new stream to continue.', fatal: true });
    ws.serverClose(1008, 'SESSION_TOO_LONG');
    await until(() => t.state === 'failed');
    const error = of('error').at(-1);
    assert.equal(error.code, 'SESSION_TOO_LONG');
    assert.equal(error.closeCode, 1008);
    assert.equal(error.fatal, true);
    assert.match(error.message, /limits a stream to 2 s/);
    assert.match(error.message, /code 1008 \(policy violation\)/);
    await sleep(50);
    assert.equal(Socket.instances.length, 1);
    assert.ok(source.stopped);
  });

  it('reconnects when the server shuts down (1001) and reports non-fatal server errors at once', async () => {
    const { t, Socket, source, of } = setup();
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    const ws = Socket.instances[0];
    ws.open();
    ws.message({ type: 'Error', code: 'TRANSCRIPTION_FAILED', description: 'The model failed on this segment.', fatal: false, start: 0, duration: 1 });
    assert.equal(of('error')[0].fatal, false);
    assert.equal(of('error')[0].origin, 'server');
    ws.message({ type: 'Error', code: 'SERVER_SHUTTING_DOWN', description: 'The server is shutting down.', fatal: true });
    ws.serverClose(1001, 'server shutting down');
    assert.equal(of('error').at(-1).code, 'SERVER_SHUTTING_DOWN');
    assert.equal(of('error').at(-1).willRetry, true);
    await until(() => Socket.instances.length === 2, 1000, 'a reconnect');
    await t.stop();
    assert.equal(t.state, 'closed');
  });

  it('reports latency from sending a final\'s last audio to receiving the final', async () => {
    const { t, Socket, source, of } = setup();
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    const ws = Socket.instances[0];
    ws.open();
    source.push(20); // 1 s
    await sleep(60);
    ws.message(results({ start: 0, duration: 1.0, text: 'Hello.' }));
    const latency = of('latency')[0];
    assert.ok(latency.ms >= 55 && latency.ms < 1000, `${latency.ms} ms`);
    assert.equal(t.latency.count, 1);
    assert.equal(of('final')[0].final.latencyMs, latency.ms);
    await t.stop();
  });

  it('keeps at most replayMs of unconfirmed audio and reports what was lost while disconnected', async () => {
    const { t, Socket, source, of } = setup({ replayMs: 500, backoffBaseMs: 200 });
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    Socket.instances[0].fail(); // never opened: the audio below is captured while disconnected
    source.push(20); // 1 s, of which 0.5 s fits
    const gaps = of('gap');
    assert.ok(gaps.length > 0);
    assert.equal(gaps.at(-1).totalSeconds, 0.5);
    await until(() => Socket.instances.length === 2, 2000, 'a reconnect');
    Socket.instances[1].open();
    assert.equal(Socket.instances[1].audio().length, 10);
    assert.equal(of('open').at(-1).offsetSeconds, 0.5); // the timeline keeps the lost half second
    await t.stop();
  });

  it('stop() during a reconnect wait cancels it and ends cleanly', async () => {
    const { t, Socket, source } = setup({ backoffBaseMs: 5000, backoffMaxMs: 5000 });
    await t.start(source);
    await until(() => Socket.instances.length === 1);
    Socket.instances[0].open();
    Socket.instances[0].fail();
    assert.equal(t.state, 'reconnecting');
    const result = await t.stop();
    assert.equal(t.state, 'closed');
    assert.equal(result.reason, 'stopped');
    await sleep(20);
    assert.equal(Socket.instances.length, 1);
  });

  it('rejects start() and reports the error when the source cannot start', async () => {
    const { t, of } = setup();
    const refused = Object.assign(new Error('Microphone access was refused.'), { code: 'MICROPHONE_DENIED' });
    await assert.rejects(t.start({ start: async () => Promise.reject(refused), stop: async () => {} }), /refused/);
    assert.equal(of('error')[0].code, 'MICROPHONE_DENIED');
    assert.equal(t.state, 'failed');
  });

  it('validates its options', () => {
    assert.throws(() => new LiveTranscriber({ url: URL_, frameMs: 10 }), RangeError);
    assert.throws(() => new LiveTranscriber({ url: URL_, maxAttempts: 0 }), RangeError);
    assert.throws(() => new LiveTranscriber({ url: URL_, keepAliveMs: 0 }), RangeError);
  });
});
