// Audio sources for LiveTranscriber: the microphone (getUserMedia -> AudioWorklet) and an audio file
// (decodeAudioData, sent at real-time pace). Both deliver 16 kHz mono Int16 frames through the same
// resampler and framer (dsp.js).
//
// A source is any object with
//   start(sink) -> Promise   sink = {frameSamples, onFrame(Int16Array), onLevel(dbfs), onEnd(), onError(err)}
//   stop() -> Promise        delivers its last frames through sink.onFrame before resolving
//   pause(), resume()        optional
// so other inputs (a MediaStream from WebRTC, a test signal) can be plugged in the same way.

import { Framer, Resampler, TARGET_SAMPLE_RATE_HZ, downmix, levelDbfs } from './dsp.js';

/** An error a source raises, with a stable `code` and a sentence a person can act on. */
export class SourceError extends Error {
  constructor(code, message, cause) {
    super(message);
    this.name = 'SourceError';
    this.code = code;
    if (cause !== undefined) this.cause = cause;
  }
}

/** Map a getUserMedia failure onto a SourceError a person can act on. */
export function microphoneError(error) {
  const name = error?.name ?? '';
  if (name === 'NotAllowedError' || name === 'PermissionDeniedError' || name === 'SecurityError') {
    return new SourceError(
      'MICROPHONE_DENIED',
      'Microphone access was refused. Allow the microphone for this page (the microphone icon in the ' +
        'address bar, or the browser\'s site settings) and press Start again, or choose an audio file instead.',
      error,
    );
  }
  if (name === 'NotFoundError' || name === 'OverconstrainedError' || name === 'DevicesNotFoundError') {
    return new SourceError(
      'MICROPHONE_NOT_FOUND',
      'No microphone was found. Connect one and press Start again, or choose an audio file instead.',
      error,
    );
  }
  if (name === 'NotReadableError' || name === 'TrackStartError' || name === 'AbortError') {
    return new SourceError(
      'MICROPHONE_BUSY',
      'The microphone could not be opened: another application may be using it, or the system blocks it.',
      error,
    );
  }
  return new SourceError('MICROPHONE_FAILED', `The microphone could not be started: ${error?.message ?? error}`, error);
}

const WORKLET_URL = new URL('./capture-worklet.js', import.meta.url);

/**
 * The microphone: getUserMedia -> MediaStreamSource -> AudioWorklet (resample to 16 kHz, Int16 frames).
 */
export class MicrophoneSource {
  /**
   * @param {{deviceId?: string, constraints?: MediaTrackConstraints}} [options]
   *   constraints: extra audio constraints (default: echo cancellation, noise suppression and automatic
   *   gain control on, as for a call).
   */
  constructor(options = {}) {
    this.options = options;
    this.label = 'microphone';
    this.sampleRateHz = null;
    this._context = null;
    this._stream = null;
    this._node = null;
    this._released = false;
  }

  async start(sink) {
    this._released = false;
    const media = globalThis.navigator?.mediaDevices;
    if (!media?.getUserMedia) {
      throw new SourceError(
        'MICROPHONE_UNAVAILABLE',
        'This page cannot use a microphone: browsers allow it only on https:// pages or http://localhost.',
      );
    }
    const audio = {
      channelCount: 1,
      echoCancellation: true,
      noiseSuppression: true,
      autoGainControl: true,
      ...(this.options.constraints ?? {}),
    };
    if (this.options.deviceId) audio.deviceId = { exact: this.options.deviceId };
    // The AudioContext is made first, while the click that called start() still counts as a user
    // gesture (some browsers only let audio start inside one).
    let loading;
    try {
      this._context = new AudioContext();
      loading = this._context.audioWorklet.addModule(WORKLET_URL);
      loading.catch(() => {}); // awaited below
    } catch (error) {
      this._release();
      throw new SourceError('AUDIO_FAILED', `The browser's audio processing could not start: ${error?.message ?? error}`, error);
    }
    try {
      this._stream = await media.getUserMedia({ audio });
    } catch (error) {
      this._release();
      throw microphoneError(error);
    }
    if (this._released) {
      this._release(); // stop() came while the permission prompt was open
      return;
    }
    const track = this._stream.getAudioTracks()[0];
    this.label = track?.label || 'microphone';
    try {
      await loading;
      if (this._context.state === 'suspended') await this._context.resume();
    } catch (error) {
      this._release();
      throw new SourceError('AUDIO_FAILED', `The browser's audio processing could not start: ${error?.message ?? error}`, error);
    }
    if (this._released) {
      this._release();
      return;
    }
    this.sampleRateHz = this._context.sampleRate;
    const node = new AudioWorkletNode(this._context, 'stream-capture', {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { frameSamples: sink.frameSamples, targetRateHz: TARGET_SAMPLE_RATE_HZ },
    });
    this._node = node;
    this._flushed = null;
    node.port.onmessage = ({ data }) => {
      if (data.type === 'frame') sink.onFrame(data.samples);
      else if (data.type === 'level') sink.onLevel(data.dbfs);
      else if (data.type === 'flushed') this._flushed?.();
    };
    const input = this._context.createMediaStreamSource(this._stream);
    input.connect(node);
    node.connect(this._context.destination); // the node writes silence; connecting keeps it pulled
    if (track) {
      track.onended = () =>
        sink.onError(new SourceError('MICROPHONE_ENDED', 'The microphone stopped (unplugged, or taken by another application).'));
    }
  }

  async stop() {
    this._released = true;
    const node = this._node;
    if (node) {
      // Let the worklet push out what its resampler and framer still hold, then tear down.
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, 500);
        this._flushed = () => {
          clearTimeout(timer);
          resolve();
        };
        node.port.postMessage({ type: 'flush' });
      });
    }
    this._release();
  }

  _release() {
    if (this._stream) for (const track of this._stream.getTracks()) {
      track.onended = null;
      track.stop();
    }
    this._stream = null;
    if (this._node) {
      this._node.port.onmessage = null;
      this._node.disconnect();
    }
    this._node = null;
    if (this._context && this._context.state !== 'closed') this._context.close().catch(() => {});
    this._context = null;
  }
}

/**
 * The sample rate in a WAV file's header, or null when `bytes` is not a RIFF/WAVE file.
 * @param {ArrayBuffer|Uint8Array} bytes
 */
export function wavSampleRate(bytes) {
  const view = bytes instanceof ArrayBuffer ? new DataView(bytes) : new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const tag = (at) => String.fromCharCode(view.getUint8(at), view.getUint8(at + 1), view.getUint8(at + 2), view.getUint8(at + 3));
  if (view.byteLength < 12 || tag(0) !== 'RIFF' || tag(8) !== 'WAVE') return null;
  let at = 12;
  while (at + 8 <= view.byteLength) {
    const size = view.getUint32(at + 4, true);
    if (tag(at) === 'fmt ' && at + 16 <= view.byteLength) {
      const rate = view.getUint32(at + 12, true);
      return rate > 0 ? rate : null;
    }
    at += 8 + size + (size % 2);
  }
  return null;
}

/**
 * An audio file (any format the browser decodes: WAV, MP3, Ogg, FLAC, M4A...), sent at real-time pace
 * through the same resampler as the microphone. Ends the stream when the file is over.
 */
export class FileSource {
  /**
   * @param {Blob|ArrayBuffer} file the recording (a File from an <input type=file>, a fetch() blob...).
   * @param {{speed?: number, monitor?: boolean, tickMs?: number}} [options]
   *   speed: pace relative to real time (default 1; the server sees the same timeline either way);
   *   monitor: also play the file through the speakers, in step with what is sent (default false).
   */
  constructor(file, options = {}) {
    this.file = file;
    this.options = options;
    this.speed = options.speed ?? 1;
    if (!(this.speed > 0 && this.speed <= 16)) throw new RangeError(`speed must be within (0, 16], not ${this.speed}`);
    this.label = file?.name ?? 'audio file';
    this.durationS = null;
    this.sampleRateHz = null;
    this._timer = null;
  }

  /** Seconds of the file sent so far. */
  get positionS() {
    return this._samples ? this._position / this.sampleRateHz : 0;
  }

  async start(sink) {
    let bytes;
    try {
      bytes = this.file instanceof ArrayBuffer ? this.file.slice(0) : await this.file.arrayBuffer();
    } catch (error) {
      throw new SourceError('FILE_UNREADABLE', `The file "${this.label}" could not be read: ${error?.message ?? error}`, error);
    }
    // decodeAudioData resamples to its context's rate: decode a WAV at its own rate so that only our
    // resampler touches the audio; other formats at 48 kHz.
    const rate = Math.min(384000, Math.max(8000, wavSampleRate(bytes) ?? 48000));
    let audio;
    try {
      const context = new OfflineAudioContext(1, 1, rate);
      audio = await context.decodeAudioData(bytes);
    } catch (error) {
      throw new SourceError(
        'FILE_UNREADABLE',
        `The file "${this.label}" is not audio this browser can decode (${error?.message ?? error}).`,
        error,
      );
    }
    const channels = [];
    for (let c = 0; c < audio.numberOfChannels; c++) channels.push(audio.getChannelData(c));
    this._samples = downmix(channels);
    this.sampleRateHz = audio.sampleRate;
    this.durationS = audio.duration;
    this._position = 0;
    this._resampler = new Resampler(audio.sampleRate, TARGET_SAMPLE_RATE_HZ);
    this._framer = new Framer(sink.frameSamples);
    this._sink = sink;
    this._audio = audio;
    this._ended = false;
    this._startedAt = performance.now();
    this._pausedAt = null;
    this._startMonitor();
    const tickMs = this.options.tickMs ?? 20;
    this._timer = setInterval(() => this._tick(), tickMs);
    this._tick();
  }

  _tick() {
    if (this._pausedAt !== null || this._ended) return;
    const elapsedS = ((performance.now() - this._startedAt) / 1000) * this.speed;
    const target = Math.min(this._samples.length, Math.floor(elapsedS * this.sampleRateHz));
    if (target > this._position) {
      const chunk = this._samples.subarray(this._position, target);
      this._position = target;
      this._emit(this._resampler.process(chunk));
      this._sink.onLevel(levelDbfs(chunk));
    }
    if (this._position >= this._samples.length) {
      this._finish();
      this._sink.onEnd();
    }
  }

  _emit(samples) {
    for (const frame of this._framer.push(samples)) this._sink.onFrame(frame);
  }

  _finish() {
    if (this._ended) return;
    this._ended = true;
    clearInterval(this._timer);
    this._timer = null;
    this._emit(this._resampler.flush());
    const last = this._framer.flush();
    if (last) this._sink.onFrame(last);
    this._stopMonitor();
  }

  pause() {
    if (this._pausedAt !== null || this._ended || !this._sink) return;
    this._pausedAt = performance.now();
    this._stopMonitor();
  }

  resume() {
    if (this._pausedAt === null) return;
    this._startedAt += performance.now() - this._pausedAt;
    this._pausedAt = null;
    this._startMonitor();
  }

  async stop() {
    if (this._sink) this._finish();
  }

  _startMonitor() {
    if (!this.options.monitor || typeof AudioContext !== 'function') return;
    try {
      this._monitorContext ??= new AudioContext();
      const node = this._monitorContext.createBufferSource();
      node.buffer = this._audio;
      node.playbackRate.value = this.speed;
      node.connect(this._monitorContext.destination);
      node.start(0, this._position / this.sampleRateHz);
      this._monitor = node;
    } catch {
      this._monitor = null; // playback is a convenience; streaming goes on without it
    }
  }

  _stopMonitor() {
    try {
      this._monitor?.stop();
    } catch {
      // already stopped
    }
    this._monitor = null;
    if (this._ended && this._monitorContext) {
      this._monitorContext.close().catch(() => {});
      this._monitorContext = null;
    }
  }
}
