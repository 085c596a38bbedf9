// Audio DSP for the browser client: resampling, float -> Int16 conversion and framing.
//
// Plain ES module with no browser or node APIs, so the same file runs inside the AudioWorklet
// (capture-worklet.js), on the page's main thread (file source) and under `node --test`.
//
// The wire format is the server's `encoding=linear16&sample_rate=16000&channels=1`: little-endian
// signed 16-bit mono at 16 kHz (README, "Protocol: parameters"). Int16Array uses the platform's byte
// order, which is little-endian on every platform a browser runs on.

/** The rate the client sends: what the server's model consumes, so it never resamples again. */
export const TARGET_SAMPLE_RATE_HZ = 16000;

/** Above this many filter phases the table is interpolated instead of exact (memory bound). */
const MAX_EXACT_PHASES = 1024;

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

/** Zeroth-order modified Bessel function of the first kind (series), for the Kaiser window. */
function besselI0(x) {
  let sum = 1;
  let term = 1;
  const half = x / 2;
  for (let k = 1; k < 64; k++) {
    term *= (half / k) * (half / k);
    sum += term;
    if (term < sum * 1e-17) break;
  }
  return sum;
}

/**
 * Streaming sample-rate converter: a Kaiser-windowed sinc low-pass FIR evaluated at exact rational
 * positions (polyphase), so 48 kHz -> 16 kHz, 44.1 kHz -> 16 kHz and any other pair of integer rates
 * are handled without dropping samples and without aliasing.
 *
 * Output sample n lies at input time n * inputRate / outputRate exactly (integer arithmetic, no drift
 * over hours); the filter is centred on it, so the output is time-aligned with the input and the
 * filter's look-ahead (`delaySamples` input samples) shows up as latency, not as a time shift.
 * Feeding the input in any chunking gives bit-for-bit the same output as one call.
 *
 * Defaults: pass band flat (ripple ~1e-4 dB) to 0.875 x the lower Nyquist (7 kHz for 16 kHz output),
 * stop band from that Nyquist (8 kHz) on, attenuated by `attenuationDb` (90 dB).
 */
export class Resampler {
  /**
   * @param {number} inputRateHz integer input rate, e.g. 44100 or 48000.
   * @param {number} outputRateHz integer output rate (default 16000).
   * @param {{passbandFraction?: number, attenuationDb?: number}} [options]
   *   passbandFraction: pass-band edge as a fraction of the lower Nyquist (0.5..0.99, default 0.875);
   *   attenuationDb: stop-band attenuation (40..140, default 90).
   */
  constructor(inputRateHz, outputRateHz = TARGET_SAMPLE_RATE_HZ, options = {}) {
    if (!Number.isInteger(inputRateHz) || inputRateHz < 1000 || inputRateHz > 768000) {
      throw new RangeError(`inputRateHz must be a whole number of Hz in 1000..768000, not ${inputRateHz}`);
    }
    if (!Number.isInteger(outputRateHz) || outputRateHz < 1000 || outputRateHz > 768000) {
      throw new RangeError(`outputRateHz must be a whole number of Hz in 1000..768000, not ${outputRateHz}`);
    }
    const passbandFraction = options.passbandFraction ?? 0.875;
    const attenuationDb = options.attenuationDb ?? 90;
    if (!(passbandFraction >= 0.5 && passbandFraction <= 0.99)) {
      throw new RangeError(`passbandFraction must be within 0.5..0.99, not ${passbandFraction}`);
    }
    if (!(attenuationDb >= 40 && attenuationDb <= 140)) {
      throw new RangeError(`attenuationDb must be within 40..140, not ${attenuationDb}`);
    }
    this.inputRateHz = inputRateHz;
    this.outputRateHz = outputRateHz;
    const g = gcd(inputRateHz, outputRateHz);
    // Output n sits at input position n * down / up.
    this._up = outputRateHz / g;
    this._down = inputRateHz / g;

    // Filter design in units of input samples.
    const nyquistHz = Math.min(inputRateHz, outputRateHz) / 2;
    const passHz = nyquistHz * passbandFraction;
    const cutoff = (passHz + nyquistHz) / 2 / inputRateHz; // -6 dB point, cycles per input sample
    const transition = (2 * Math.PI * (nyquistHz - passHz)) / inputRateHz; // radians per input sample
    const beta =
      attenuationDb > 50
        ? 0.1102 * (attenuationDb - 8.7)
        : 0.5842 * (attenuationDb - 21) ** 0.4 + 0.07886 * (attenuationDb - 21);
    const length = Math.ceil((attenuationDb - 8) / (2.285 * transition)) + 1;
    const half = Math.ceil(length / 2); // taps each side of the output position
    this._half = half;
    this._taps = 2 * half;

    // One row of taps per phase (fractional position). Exact when the rational step has few phases,
    // else a fine table with linear interpolation between neighbouring rows.
    this._exact = this._up <= MAX_EXACT_PHASES;
    const phases = this._exact ? this._up : MAX_EXACT_PHASES;
    this._phases = phases;
    const rows = this._exact ? phases : phases + 1;
    const table = new Float64Array(rows * this._taps);
    const i0Beta = besselI0(beta);
    for (let p = 0; p < rows; p++) {
      const frac = p / phases;
      let sum = 0;
      for (let i = 0; i < this._taps; i++) {
        // Tap i multiplies input m = pos + half - i, whose distance from the output time is tau.
        const tau = frac + i - half;
        const x = 2 * cutoff * tau;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const r = tau / (half + 1);
        const window = Math.abs(r) >= 1 ? 0 : besselI0(beta * Math.sqrt(1 - r * r)) / i0Beta;
        const value = 2 * cutoff * sinc * window;
        table[p * this._taps + i] = value;
        sum += value;
      }
      // Unity gain at DC for every phase (removes a tiny ripple of the truncated sum).
      for (let i = 0; i < this._taps; i++) table[p * this._taps + i] /= sum;
    }
    this._table = table;

    // Input history: _buf[k] is input sample (_bufStart + k); samples before 0 are zeros.
    this._buf = new Float32Array(Math.max(4096, 4 * this._taps));
    this._bufLen = 0;
    this._bufStart = -half;
    this._buf.fill(0, 0, half);
    this._bufLen = half;
    this._pos = 0; // integer input position of the next output
    this._phase = 0; // its fraction, in units of 1/_up
    this._inputCount = 0;
    this._outputCount = 0;
    this._flushed = false;
  }

  /** Input samples the filter looks ahead: the resampler's latency, in input samples. */
  get delaySamples() {
    return this._half;
  }

  /** Output samples produced so far. */
  get outputCount() {
    return this._outputCount;
  }

  /** Input samples taken so far. */
  get inputCount() {
    return this._inputCount;
  }

  _append(samples) {
    if (this._bufLen + samples.length > this._buf.length) {
      // Drop history no future output needs: the next output reads inputs from _pos - half + 1 on.
      const keepFrom = Math.max(0, Math.min(this._bufLen, this._pos - this._half + 1 - this._bufStart));
      const kept = this._bufLen - keepFrom;
      const size = Math.max(this._buf.length, 2 * (kept + samples.length));
      if (size > this._buf.length) {
        const next = new Float32Array(size);
        next.set(this._buf.subarray(keepFrom, this._bufLen));
        this._buf = next;
      } else {
        this._buf.copyWithin(0, keepFrom, this._bufLen);
      }
      this._bufStart += keepFrom;
      this._bufLen = kept;
    }
    this._buf.set(samples, this._bufLen);
    this._bufLen += samples.length;
  }

  _run(lastInput) {
    // Outputs whose window [pos - half + 1, pos + half] lies within input known up to lastInput.
    const out = [];
    const taps = this._taps;
    const half = this._half;
    const table = this._table;
    const buf = this._buf;
    const up = this._up;
    const down = this._down;
    const exact = this._exact;
    const phases = this._phases;
    while (this._pos + half <= lastInput) {
      const base = this._pos + half - this._bufStart; // buffer index of tap 0's input
      let acc = 0;
      if (exact) {
        const row = this._phase * taps;
        for (let i = 0; i < taps; i++) acc += table[row + i] * buf[base - i];
      } else {
        const where = (this._phase / up) * phases;
        const p = Math.floor(where);
        const w = where - p;
        const row0 = p * taps;
        const row1 = row0 + taps;
        for (let i = 0; i < taps; i++) {
          acc += (table[row0 + i] + w * (table[row1 + i] - table[row0 + i])) * buf[base - i];
        }
      }
      out.push(acc);
      this._phase += down;
      if (this._phase >= up) {
        this._pos += Math.floor(this._phase / up);
        this._phase %= up;
      }
    }
    this._outputCount += out.length;
    return Float32Array.from(out);
  }

  /**
   * Take the next input samples and return every output sample they complete.
   * @param {Float32Array|number[]} samples input at inputRateHz.
   * @returns {Float32Array} output at outputRateHz (possibly empty).
   */
  process(samples) {
    if (this._flushed) throw new Error('Resampler.process() after flush(); make a new Resampler');
    if (samples.length === 0) return new Float32Array(0);
    this._append(samples);
    this._inputCount += samples.length;
    return this._run(this._bufStart + this._bufLen - 1);
  }

  /**
   * End of input: return the outputs still held back by the filter's look-ahead, so that in total
   * round(inputCount * outputRate / inputRate) samples came out (input beyond the end counts as silence).
   * @returns {Float32Array}
   */
  flush() {
    if (this._flushed) return new Float32Array(0);
    this._flushed = true;
    const total = Math.round((this._inputCount * this._up) / this._down);
    const missing = total - this._outputCount;
    if (missing <= 0) return new Float32Array(0);
    this._append(new Float32Array(this._half + Math.ceil((missing * this._down) / this._up) + 2));
    const tail = this._run(this._bufStart + this._bufLen - 1);
    this._outputCount -= tail.length - Math.min(tail.length, missing);
    return tail.subarray(0, missing);
  }
}

/**
 * Convert float samples in [-1, 1] to signed 16-bit, rounding to nearest and clipping out-of-range
 * values (-1 -> -32768, +1 -> 32767; NaN -> 0).
 * @param {Float32Array|number[]} samples
 * @param {Int16Array} [out] where to write (default: a new array of the same length)
 * @returns {Int16Array}
 */
export function floatToInt16(samples, out = new Int16Array(samples.length)) {
  for (let i = 0; i < samples.length; i++) {
    const x = samples[i];
    let v;
    if (x > 0) v = x >= 1 ? 32767 : Math.round(x * 32767);
    else if (x < 0) v = x <= -1 ? -32768 : Math.round(x * 32768);
    else v = 0; // 0, -0 and NaN
    out[i] = v;
  }
  return out;
}

/**
 * Average interleaved-free channel arrays into one mono array.
 * @param {Float32Array[]} channels one array per channel, equal lengths
 * @returns {Float32Array}
 */
export function downmix(channels) {
  if (channels.length === 0) return new Float32Array(0);
  if (channels.length === 1) return channels[0];
  const out = new Float32Array(channels[0].length);
  for (const channel of channels) for (let i = 0; i < out.length; i++) out[i] += channel[i];
  const scale = 1 / channels.length;
  for (let i = 0; i < out.length; i++) out[i] *= scale;
  return out;
}

/**
 * Cuts a stream of float samples into fixed-size Int16 frames (the WebSocket messages).
 *
 * Every frame holds exactly `frameSamples` samples except the one `flush()` returns at the end.
 */
export class Framer {
  /**
   * @param {number} frameSamples samples per frame, e.g. 800 for 50 ms at 16 kHz.
   */
  constructor(frameSamples) {
    if (!Number.isInteger(frameSamples) || frameSamples < 1) {
      throw new RangeError(`frameSamples must be a positive whole number, not ${frameSamples}`);
    }
    this.frameSamples = frameSamples;
    this._frame = new Int16Array(frameSamples);
    this._fill = 0;
  }

  /** Samples waiting for the next frame. */
  get pending() {
    return this._fill;
  }

  /**
   * @param {Float32Array|number[]} samples float samples in [-1, 1] (clipped beyond).
   * @returns {Int16Array[]} the frames completed by these samples, each with its own buffer.
   */
  push(samples) {
    const frames = [];
    const converted = floatToInt16(samples);
    let offset = 0;
    while (offset < converted.length) {
      const take = Math.min(this.frameSamples - this._fill, converted.length - offset);
      this._frame.set(converted.subarray(offset, offset + take), this._fill);
      this._fill += take;
      offset += take;
      if (this._fill === this.frameSamples) {
        frames.push(this._frame);
        this._frame = new Int16Array(this.frameSamples);
        this._fill = 0;
      }
    }
    return frames;
  }

  /** @returns {Int16Array|null} the last, shorter frame, or null when nothing is pending. */
  flush() {
    if (this._fill === 0) return null;
    const last = this._frame.slice(0, this._fill);
    this._fill = 0;
    return last;
  }
}

/**
 * Whole samples per frame of `frameMs` at the target rate, checking the 20..100 ms range the client uses.
 * @param {number} frameMs
 * @param {number} [sampleRateHz]
 */
export function frameSamplesFor(frameMs, sampleRateHz = TARGET_SAMPLE_RATE_HZ) {
  if (!(frameMs >= 20 && frameMs <= 100)) {
    throw new RangeError(`frameMs must be within 20..100, not ${frameMs}`);
  }
  return Math.round((frameMs * sampleRateHz) / 1000);
}

/**
 * Root-mean-square level of float samples in dBFS (a full-scale sine reads -3 dB), -120 for silence.
 * @param {Float32Array|number[]} samples
 */
export function levelDbfs(samples) {
  if (samples.length === 0) return -120;
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  const rms = Math.sqrt(sum / samples.length);
  return rms > 1e-6 ? Math.max(-120, 20 * Math.log10(rms)) : -120;
}
