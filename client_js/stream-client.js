// Browser client for stream_server's /v1/listen WebSocket (README, "Protocol"): streams 16 kHz mono
// linear16 audio from a source (microphone or file, see sources.js), turns the server's events into
// DOM-style events, keeps every final transcript client-side, and reconnects with exponential backoff.
//
// No build step: import this file as an ES module. See README.md in this folder for the API.

import { TARGET_SAMPLE_RATE_HZ, frameSamplesFor } from './dsp.js';
import { toSrt, toText, toVtt } from './formats.js';

export { TARGET_SAMPLE_RATE_HZ } from './dsp.js';
export { FileSource, MicrophoneSource, SourceError } from './sources.js';
export { toCues, toSrt, toText, toVtt, formatTimestamp } from './formats.js';

/** Close codes after which the client reconnects (the server went away or failed, not the client). */
export const RETRYABLE_CLOSE_CODES = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014]);

const CLOSE_CODE_NAMES = {
  1000: 'normal',
  1001: 'going away',
  1002: 'protocol error',
  1003: 'unsupported data',
  1005: 'no status',
  1006: 'connection lost',
  1007: 'invalid payload',
  1008: 'policy violation',
  1009: 'message too big',
  1011: 'server error',
  1012: 'service restart',
  1013: 'try again later',
  1014: 'bad gateway',
};

/** Default options; see README.md, "Options". */
export const DEFAULT_OPTIONS = Object.freeze({
  url: null,
  params: { interim_results: true, punctuate: true },
  token: null,
  getToken: null,
  authScheme: 'bearer',
  frameMs: 50,
  keepAliveMs: 4000,
  connectTimeoutMs: 10000,
  closeTimeoutMs: 10000,
  reconnect: true,
  maxAttempts: 8,
  backoffBaseMs: 500,
  backoffMaxMs: 15000,
  backoffJitter: 0.2,
  stableAfterMs: 5000,
  replayMs: 30000,
  healthUrl: undefined,
  WebSocket: undefined,
  fetch: undefined,
});

/** The WebSocket URL of the page's own server: ws(s)://<host><path-prefix>/v1/listen. */
export function defaultListenUrl(base = globalThis.location?.href) {
  if (!base) throw new Error('no url given and no page location to derive one from');
  const url = new URL('v1/listen', base);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = '';
  url.hash = '';
  return url.href;
}

/** The /health URL next to a /v1/listen WebSocket URL. */
export function healthUrlFor(listenUrl) {
  const url = new URL(listenUrl);
  url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
  url.pathname = url.pathname.replace(/v1\/listen\/?$/, '') + 'health';
  url.search = '';
  url.hash = '';
  return url.href;
}

function closeText(code, reason) {
  const name = CLOSE_CODE_NAMES[code];
  const bits = [`code ${code}${name ? ` (${name})` : ''}`];
  if (reason) bits.push(`reason "${reason}"`);
  return bits.join(', ');
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(1)} s`;
}

/**
 * A live transcription stream. Extends EventTarget: listen with addEventListener(type, e => e.detail).
 *
 * Events: state, open, interim, final, speechstarted, utteranceend, metadata, latency, level, gap,
 * error, close, end (README.md, "Events").
 */
export class LiveTranscriber extends EventTarget {
  /** @param {Partial<typeof DEFAULT_OPTIONS>} [options] */
  constructor(options = {}) {
    super();
    const o = { ...DEFAULT_OPTIONS, ...options, params: { ...DEFAULT_OPTIONS.params, ...(options.params ?? {}) } };
    o.url = o.url ?? defaultListenUrl();
    if (o.healthUrl === undefined) {
      try {
        o.healthUrl = healthUrlFor(o.url);
      } catch {
        o.healthUrl = null;
      }
    }
    this.frameSamples = frameSamplesFor(o.frameMs);
    for (const name of ['keepAliveMs', 'connectTimeoutMs', 'closeTimeoutMs', 'backoffBaseMs', 'backoffMaxMs']) {
      if (!(o[name] > 0)) throw new RangeError(`${name} must be a positive number of milliseconds`);
    }
    if (!(Number.isInteger(o.maxAttempts) && o.maxAttempts >= 1)) {
      throw new RangeError('maxAttempts must be a whole number >= 1');
    }
    if (!['bearer', 'token'].includes(o.authScheme)) {
      throw new RangeError("authScheme must be 'bearer' (a grant token) or 'token' (an API key)");
    }
    if (o.getToken !== null && typeof o.getToken !== 'function') throw new TypeError('getToken must be a function');
    this.options = o;
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    this._fetch = o.fetch ?? globalThis.fetch?.bind(globalThis);
    this.state = 'idle';
    this._reset();
  }

  _reset() {
    this._finals = [];
    this._metadata = [];
    this._source = null;
    this._conn = null;
    this._pending = []; // frames not yet confirmed by a final: {start, samples, data, sentAt}
    this._pendingSamples = 0;
    this._timelineSamples = 0; // every sample taken from the source (not counting paused time)
    this._gapSamples = 0;
    this._paused = false;
    this._stopping = false;
    this._attempt = 0;
    this._connections = 0;
    this._everOpened = false;
    this._retryTimer = null;
    this._keepAliveTimer = null;
    this._stableTimer = null;
    this._lastSendAt = 0;
    this._latencies = [];
    this._lastInterim = '';
    this._stopped = null;
    this._sentCredential = false;
  }

  // ------------------------------------------------------------------------------------------------
  // Public API

  /** Every non-empty final so far, in time order (session times continue across reconnects). */
  get finals() {
    return this._finals.slice();
  }

  /** Metadata events received (one per stream that ended cleanly). */
  get metadata() {
    return this._metadata.slice();
  }

  /** Whether audio is currently muted (paused). */
  get paused() {
    return this._paused;
  }

  /** Seconds of audio taken from the source so far (the transcript timeline's length). */
  get audioSeconds() {
    return this._timelineSamples / TARGET_SAMPLE_RATE_HZ;
  }

  /** Latency statistics in ms over the finals so far: {last, average, count}. */
  get latency() {
    const n = this._latencies.length;
    return {
      last: n ? this._latencies[n - 1] : null,
      average: n ? this._latencies.reduce((a, b) => a + b, 0) / n : null,
      count: n,
    };
  }

  /** The transcript as plain text (see formats.js toText). */
  toText(options) {
    return toText(this._finals, options);
  }

  /** The transcript as SubRip subtitles. */
  toSrt(options) {
    return toSrt(this._finals, options);
  }

  /** The transcript as WebVTT subtitles. */
  toVtt(options) {
    return toVtt(this._finals, options);
  }

  /**
   * Start capturing from `source` and streaming to the server.
   *
   * Resolves once the source runs (the connection proceeds in the background and reports through
   * events); rejects when the source cannot start (e.g. the microphone was refused), after an
   * `error` event with the same message.
   * @param {{start: Function, stop: Function, pause?: Function, resume?: Function, label?: string}} source
   */
  async start(source) {
    if (!['idle', 'closed', 'failed'].includes(this.state)) {
      throw new Error(`start() while ${this.state}; call stop() first`);
    }
    this._reset();
    this._source = source;
    this._setState('starting');
    const sink = {
      frameSamples: this.frameSamples,
      onFrame: (frame) => this._onFrame(frame),
      onLevel: (dbfs) => this._emit('level', { dbfs }),
      onEnd: () => {
        if (!this._stopping) this.stop({ reason: 'source-ended' });
      },
      onError: (error) => this._onSourceError(error),
    };
    try {
      await source.start(sink);
    } catch (error) {
      this._source = null;
      this._emitError({
        code: error?.code ?? 'SOURCE_FAILED',
        message: error?.message ?? String(error),
        fatal: true,
        origin: 'source',
      });
      this._setState('failed');
      throw error;
    }
    if (this._stopping) {
      // stop() was called while the source was starting (e.g. during the permission prompt).
      await Promise.resolve(source.stop()).catch(() => {});
      return;
    }
    this._keepAliveTimer = setInterval(() => this._keepAlive(), Math.min(1000, this.options.keepAliveMs / 2));
    this._connect();
  }

  /** Mute: audio is dropped (and not part of the timeline); KeepAlive holds the stream open. */
  pause() {
    if (this._paused) return;
    this._paused = true;
    this._source?.pause?.();
    this._emit('state', { state: this.state, previous: this.state, paused: true });
  }

  /** Unmute after pause(). */
  resume() {
    if (!this._paused) return;
    this._paused = false;
    this._source?.resume?.();
    this._emit('state', { state: this.state, previous: this.state, paused: false });
  }

  /** Ask the server to finalize the open segment now (its final has fromFinalize=true). */
  finalize() {
    this._sendText({ type: 'Finalize' });
  }

  /**
   * Stop: flush the source, send CloseStream and wait (up to closeTimeoutMs) for the server's last
   * finals, Metadata and close. Resolves with {finals, metadata}.
   */
  async stop({ reason = 'stopped' } = {}) {
    if (this._stopped) return this._stopped;
    if (this.state === 'idle') return { finals: this.finals, metadata: this.metadata };
    this._stopping = true;
    this._stopped = this._stop(reason);
    return this._stopped;
  }

  async _stop(reason) {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const source = this._source;
    this._source = null;
    if (source) {
      try {
        await source.stop(); // its last frames arrive through onFrame before this resolves
      } catch (error) {
        this._emitError({ code: 'SOURCE_FAILED', message: `Stopping the source failed: ${error?.message ?? error}`, fatal: false, origin: 'source' });
      }
    }
    const conn = this._conn;
    if (conn && conn.opened && conn.ws.readyState === 1) {
      this._setState('closing');
      this._sendText({ type: 'CloseStream' });
      let timer;
      const closed = await Promise.race([
        conn.closed,
        new Promise((resolve) => (timer = setTimeout(() => resolve(false), this.options.closeTimeoutMs))),
      ]);
      clearTimeout(timer);
      if (closed === false) {
        this._emitError({
          code: 'CLOSE_TIMEOUT',
          message: `The server did not finish the stream within ${seconds(this.options.closeTimeoutMs)} of CloseStream; the last words may be missing.`,
          fatal: false,
          origin: 'connection',
        });
        conn.ws.close(1000, 'client stop');
      }
    } else if (conn) {
      conn.ws.close(1000, 'client stop');
    }
    this._conn = null;
    clearInterval(this._keepAliveTimer);
    clearTimeout(this._stableTimer);
    if (this.state !== 'failed') this._setState('closed');
    const result = { finals: this.finals, metadata: this.metadata, reason };
    this._emit('end', result);
    return result;
  }

  // ------------------------------------------------------------------------------------------------
  // Audio

  _onFrame(frame) {
    if (this._paused || this.state === 'failed' || this.state === 'closed') return;
    if (!(frame instanceof Int16Array)) frame = new Int16Array(frame);
    if (frame.length === 0) return; // an empty frame would mean CloseStream to the server
    const entry = { start: this._timelineSamples, samples: frame.length, data: frame, sentAt: null };
    this._timelineSamples += frame.length;
    this._pending.push(entry);
    this._pendingSamples += frame.length;
    this._trimPending();
    const conn = this._conn;
    if (conn && conn.opened && conn.ws.readyState === 1) this._sendFrame(conn, entry);
  }

  _trimPending() {
    const limit = Math.round((this.options.replayMs / 1000) * TARGET_SAMPLE_RATE_HZ);
    let lost = 0;
    while (this._pendingSamples > limit && this._pending.length > 1) {
      const dropped = this._pending.shift();
      this._pendingSamples -= dropped.samples;
      if (dropped.sentAt === null) lost += dropped.samples;
    }
    if (lost) {
      this._gapSamples += lost;
      this._emit('gap', {
        seconds: lost / TARGET_SAMPLE_RATE_HZ,
        totalSeconds: this._gapSamples / TARGET_SAMPLE_RATE_HZ,
        message: 'Audio captured while disconnected exceeded the replay buffer and was not transcribed.',
      });
    }
  }

  _sendFrame(conn, entry) {
    conn.ws.send(entry.data);
    entry.sentAt = performance.now();
    this._lastSendAt = entry.sentAt;
  }

  _sendText(message) {
    const conn = this._conn;
    if (!conn || !conn.opened || conn.ws.readyState !== 1) return false;
    conn.ws.send(JSON.stringify(message));
    this._lastSendAt = performance.now();
    return true;
  }

  _keepAlive() {
    if (this._stopping) return; // after CloseStream the server expects nothing more
    if (performance.now() - this._lastSendAt >= this.options.keepAliveMs) this._sendText({ type: 'KeepAlive' });
  }

  _onSourceError(error) {
    this._emitError({
      code: error?.code ?? 'SOURCE_FAILED',
      message: error?.message ?? String(error),
      fatal: true,
      origin: 'source',
    });
    this.stop({ reason: 'source-error' });
  }

  // ------------------------------------------------------------------------------------------------
  // Connection

  _buildUrl() {
    const url = new URL(this.options.url);
    const params = {
      ...Object.fromEntries(
        Object.entries(this.options.params).filter(([, v]) => v !== undefined && v !== null && v !== ''),
      ),
      encoding: 'linear16',
      sample_rate: String(TARGET_SAMPLE_RATE_HZ),
      channels: '1',
    };
    for (const [key, value] of Object.entries(params)) url.searchParams.set(key, String(value));
    return url.href;
  }

  /**
   * The credential for the next connection attempt, or null: `getToken()`, called before every
   * attempt so that a short-lived grant token is always fresh, or the fixed `token`. It travels as the
   * WebSocket subprotocol pair [authScheme, token] (browsers cannot set an Authorization header on a
   * WebSocket), never in the URL, which ends up in logs (README, "Authentication").
   */
  async _credential() {
    const value = this.options.getToken ? await this.options.getToken() : this.options.token;
    if (value === null || value === undefined || value === '') return null;
    const token = typeof value === 'string' ? value : (value.token ?? value.access_token);
    if (typeof token !== 'string' || !token) {
      throw new TypeError('getToken() must give a token string, or an object with `token` or `access_token`');
    }
    return token;
  }

  async _connect() {
    if (this._stopping) return;
    this._attempt += 1;
    const attempt = this._attempt;
    this._setState('connecting', { attempt, maxAttempts: this.options.maxAttempts });
    let token;
    try {
      token = await this._credential();
    } catch (error) {
      this._connectionFailed(null, `Could not get a token for the connection: ${error?.message ?? error}`, 'AUTH_FAILED');
      return;
    }
    if (this._stopping) return;
    this._sentCredential = Boolean(token);
    let ws;
    try {
      const url = this._buildUrl();
      ws = token ? new this._WebSocket(url, [this.options.authScheme, token]) : new this._WebSocket(url);
    } catch (error) {
      this._connectionFailed(null, `Invalid server address ${this.options.url}: ${error?.message ?? error}`, 'BAD_URL', false);
      return;
    }
    ws.binaryType = 'arraybuffer';
    let resolveClosed;
    const conn = {
      ws,
      id: ++this._connections,
      opened: false,
      offsetSamples: 0,
      serverError: null,
      closed: new Promise((resolve) => (resolveClosed = resolve)),
      resolveClosed,
      connectTimer: null,
    };
    this._conn = conn;
    conn.connectTimer = setTimeout(() => {
      if (!conn.opened) {
        conn.timedOut = true;
        ws.close();
        this._onClose(conn, { code: 1006, reason: '', wasClean: false });
      }
    }, this.options.connectTimeoutMs);
    ws.onopen = () => this._onOpen(conn);
    ws.onmessage = (event) => this._onMessage(conn, event.data);
    ws.onclose = (event) => this._onClose(conn, event);
    ws.onerror = () => {}; // a close event always follows, with the code
  }

  _onOpen(conn) {
    if (this._conn !== conn) return;
    clearTimeout(conn.connectTimer);
    conn.opened = true;
    this._everOpened = true;
    const first = this._pending[0];
    conn.offsetSamples = first ? first.start : this._timelineSamples;
    const replayed = this._pending.filter((entry) => entry.sentAt !== null);
    const replayedSamples = replayed.reduce((sum, entry) => sum + entry.samples, 0);
    this._setState('open', { attempt: this._attempt });
    this._emit('open', {
      url: this.options.url,
      connection: conn.id,
      offsetSeconds: conn.offsetSamples / TARGET_SAMPLE_RATE_HZ,
      replayedSeconds: replayedSamples / TARGET_SAMPLE_RATE_HZ,
      replayedFrames: replayed.length,
    });
    for (const entry of this._pending) this._sendFrame(conn, entry);
    this._lastSendAt = performance.now();
    clearTimeout(this._stableTimer);
    this._stableTimer = setTimeout(() => {
      if (this._conn === conn) this._attempt = 0;
    }, this.options.stableAfterMs);
  }

  _onMessage(conn, data) {
    if (typeof data !== 'string') return;
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    const offset = conn.offsetSamples / TARGET_SAMPLE_RATE_HZ;
    switch (message.type) {
      case 'Results':
        this._onResults(conn, message, offset);
        break;
      case 'SpeechStarted':
        this._emit('speechstarted', { timestamp: offset + (message.timestamp ?? 0), message });
        break;
      case 'UtteranceEnd':
        this._emit('utteranceend', { lastWordEnd: offset + (message.last_word_end ?? 0), message });
        break;
      case 'Metadata':
        this._metadata.push(message);
        this._emit('metadata', { metadata: message });
        break;
      case 'Error':
        if (message.fatal) {
          conn.serverError = message; // reported with the close code when the close arrives
        } else {
          this._emitError({
            code: message.code ?? 'ERROR',
            message: message.description ?? message.message ?? 'The server reported an error.',
            fatal: false,
            origin: 'server',
            start: message.start !== undefined ? offset + message.start : undefined,
            duration: message.duration,
          });
        }
        break;
      default:
        break;
    }
  }

  _onResults(conn, message, offset) {
    const alternative = message.channel?.alternatives?.[0] ?? {};
    const text = String(alternative.transcript ?? '').trim();
    const start = offset + (message.start ?? 0);
    const end = start + (message.duration ?? 0);
    const tags = message.tags ?? {};
    if (!message.is_final) {
      this._lastInterim = text;
      this._emit('interim', { text, start, end, language: tags.language ?? null, message });
      return;
    }
    const endSample = Math.round(end * TARGET_SAMPLE_RATE_HZ);
    const latencyMs = this._latencyFor(endSample);
    const final = {
      text,
      start,
      end,
      confidence: alternative.confidence ?? null,
      words: (alternative.words ?? []).map((w) => ({
        word: w.word,
        punctuated_word: w.punctuated_word ?? w.word,
        start: offset + w.start,
        end: offset + w.end,
        confidence: w.confidence,
      })),
      language: tags.language ?? alternative.languages?.[0] ?? null,
      emotion: tags.emotion ?? null,
      audioEvent: tags.audio_event ?? null,
      speechFinal: Boolean(message.speech_final),
      fromFinalize: Boolean(message.from_finalize),
      connection: conn.id,
      receivedAt: Date.now(),
      latencyMs,
    };
    // Audio up to this final's end is transcribed: it never needs resending.
    while (this._pending.length && this._pending[0].start + this._pending[0].samples <= endSample) {
      this._pendingSamples -= this._pending.shift().samples;
    }
    this._lastInterim = '';
    if (text) this._finals.push(final);
    this._emit('final', { final, stored: Boolean(text), message });
    if (latencyMs !== null && text) {
      this._latencies.push(latencyMs);
      if (this._latencies.length > 1000) this._latencies.shift();
      this._emit('latency', { ms: latencyMs, ...this.latency });
    }
  }

  /** ms from sending the audio at `endSample` (the final's last sample) to now, or null. */
  _latencyFor(endSample) {
    const target = endSample - 1;
    let best = null;
    for (const entry of this._pending) {
      if (entry.sentAt === null) break;
      best = entry;
      if (entry.start + entry.samples > target) break;
    }
    return best ? Math.max(0, performance.now() - best.sentAt) : null;
  }

  _onClose(conn, event) {
    if (conn.closedHandled) return;
    conn.closedHandled = true;
    clearTimeout(conn.connectTimer);
    conn.resolveClosed(true);
    if (this._conn !== conn) return;
    this._conn = null;
    const code = event.code ?? 1006;
    const reason = event.reason ?? '';
    const serverError = conn.serverError;
    if (!conn.opened) {
      // The handshake failed (browsers hide the HTTP status): server down, refused, or timed out.
      this._emit('close', { code, reason, wasClean: false, opened: false });
      const what = conn.timedOut
        ? `no answer within ${seconds(this.options.connectTimeoutMs)}`
        : 'the connection failed';
      this._connectionFailed(conn, `Could not connect to ${this.options.url} (${what})`, 'CONNECT_FAILED');
      return;
    }
    const retry = RETRYABLE_CLOSE_CODES.has(code) && this.options.reconnect && !this._stopping;
    this._emit('close', { code, reason, wasClean: Boolean(event.wasClean), opened: true, willReconnect: retry, serverError });
    if (this._stopping) {
      if (code !== 1000 || serverError) {
        this._emitError(this._closeError(code, reason, serverError, false));
      }
      return;
    }
    if (code === 1000 && !serverError) {
      // The server ended the stream without being asked (it should not): end cleanly.
      this.stop({ reason: 'server-closed' });
      return;
    }
    if (retry) {
      this._scheduleReconnect(this._closeError(code, reason, serverError, true));
      return;
    }
    this._emitError(this._closeError(code, reason, serverError, false));
    this._fail();
  }

  _closeError(code, reason, serverError, willRetry) {
    const how = `the server closed the stream with ${closeText(code, reason)}`;
    const message = serverError
      ? `${serverError.description ?? serverError.message} (${serverError.code}; ${how})`
      : code === 1006
        ? 'Lost the connection to the server (code 1006: no close frame; the server stopped or the network dropped)'
        : `The stream ended unexpectedly: ${how}`;
    return {
      code: serverError?.code ?? (code === 1006 ? 'CONNECTION_LOST' : 'STREAM_CLOSED'),
      message,
      description: serverError?.description ?? null,
      closeCode: code,
      closeReason: reason,
      fatal: !willRetry,
      origin: serverError ? 'server' : 'connection',
    };
  }

  async _connectionFailed(conn, message, code, retryable = true) {
    const attempt = this._attempt;
    const canRetry = retryable && this.options.reconnect && attempt < this.options.maxAttempts && !this._stopping;
    const diagnosis = await this._diagnose();
    if (this._stopping) return;
    const full = diagnosis ? `${message}: ${diagnosis}` : message;
    if (canRetry) {
      this._scheduleReconnect({ code, message: full, fatal: false, origin: 'connection' });
    } else {
      const tail = attempt > 1 ? ` Gave up after ${attempt} attempts.` : '';
      this._emitError({ code, message: `${full}.${tail}`, fatal: true, origin: 'connection' });
      this._fail();
    }
  }

  /** Ask /health why a connection failed; a sentence, or null when there is nothing to add. */
  async _diagnose() {
    const url = this.options.healthUrl;
    if (!url || !this._fetch) return null;
    const controller = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = setTimeout(() => controller?.abort(), 3000);
    try {
      const response = await this._fetch(url, { signal: controller?.signal, cache: 'no-store' });
      let body = {};
      try {
        body = await response.json();
      } catch {
        body = {};
      }
      if (response.ok && body.ready && body.auth_required && !this._sentCredential) {
        return 'the server requires a token and none was given (see the getToken option)';
      }
      if (response.ok && body.ready && body.auth_required) {
        return 'the server is up but refused this stream (the token was not accepted, or it is at its session limit, or a parameter it does not accept)';
      }
      if (response.ok && body.ready) {
        return 'the server is up but refused this stream (at its session limit, or a parameter it does not accept)';
      }
      if (body.status === 'loading') return 'the server is still loading its model';
      if (body.status === 'draining') return 'the server is shutting down';
      if (body.status === 'failed') return `the server could not load its model${body.error ? ` (${body.error})` : ''}`;
      return `the server's health check answered HTTP ${response.status}`;
    } catch {
      return 'the server is not reachable (is it running, and is the address right?)';
    } finally {
      clearTimeout(timer);
    }
  }

  _scheduleReconnect(error) {
    const attempt = this._attempt;
    if (attempt >= this.options.maxAttempts) {
      this._emitError({ ...error, message: `${error.message}. Gave up after ${attempt} attempts.`, fatal: true });
      this._fail();
      return;
    }
    const { backoffBaseMs, backoffMaxMs, backoffJitter } = this.options;
    const base = Math.min(backoffMaxMs, backoffBaseMs * 2 ** Math.max(0, attempt - 1));
    const delayMs = Math.round(base * (1 - backoffJitter + 2 * backoffJitter * Math.random()));
    const next = attempt + 1;
    const again = this._everOpened ? 'Reconnecting' : 'Retrying';
    const kept = this._everOpened ? '; finals so far are kept' : '';
    this._emitError({
      ...error,
      message: `${error.message}. ${again} in ${seconds(delayMs)} (attempt ${next} of ${this.options.maxAttempts})${kept}.`,
      fatal: false,
      willRetry: true,
      retryInMs: delayMs,
      attempt: next,
    });
    this._setState('reconnecting', { attempt: next, maxAttempts: this.options.maxAttempts, delayMs, everOpened: this._everOpened });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._connect();
    }, delayMs);
  }

  _fail() {
    clearTimeout(this._retryTimer);
    clearInterval(this._keepAliveTimer);
    clearTimeout(this._stableTimer);
    this._setState('failed');
    const source = this._source;
    this._source = null;
    this._stopping = true;
    this._stopped = Promise.resolve({ finals: this.finals, metadata: this.metadata, reason: 'failed' });
    if (source) Promise.resolve(source.stop()).catch(() => {});
    this._emit('end', { finals: this.finals, metadata: this.metadata, reason: 'failed' });
  }

  // ------------------------------------------------------------------------------------------------
  // Events

  _setState(state, extra = {}) {
    const previous = this.state;
    this.state = state;
    this._emit('state', { state, previous, paused: this._paused, ...extra });
  }

  _emitError(detail) {
    this._emit('error', { willRetry: false, ...detail });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
