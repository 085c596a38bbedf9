// Unit tests of the resampler, float -> Int16 conversion and framing (node --test).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { Framer, Resampler, downmix, floatToInt16, frameSamplesFor, levelDbfs } from '../../dsp.js';

function tone(frequencyHz, rateHz, seconds, amplitude = 0.5) {
  const out = new Float32Array(Math.round(rateHz * seconds));
  for (let i = 0; i < out.length; i++) out[i] = amplitude * Math.sin((2 * Math.PI * frequencyHz * i) / rateHz);
  return out;
}

function concat(chunks) {
  const out = new Float32Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

function resampleAll(input, from, to = 16000) {
  const r = new Resampler(from, to);
  return concat([r.process(input), r.flush()]);
}

/** Amplitude and phase of `frequencyHz` in `x` by correlation (x long enough for whole cycles to dominate). */
function measure(x, frequencyHz, rateHz) {
  let re = 0;
  let im = 0;
  for (let i = 0; i < x.length; i++) {
    const w = (2 * Math.PI * frequencyHz * i) / rateHz;
    re += x[i] * Math.cos(w);
    im += x[i] * Math.sin(w);
  }
  return { amplitude: (2 * Math.hypot(re, im)) / x.length };
}

function rms(x) {
  let s = 0;
  for (const v of x) s += v * v;
  return Math.sqrt(s / x.length);
}

/** The strongest frequency in `x`, by a fine scan of the correlation amplitude. */
function peakFrequency(x, rateHz, fromHz, toHz, stepHz) {
  let best = { f: fromHz, a: -1 };
  for (let f = fromHz; f <= toHz; f += stepHz) {
    const { amplitude } = measure(x, f, rateHz);
    if (amplitude > best.a) best = { f, a: amplitude };
  }
  return best.f;
}

describe('Resampler', () => {
  for (const fromHz of [48000, 44100]) {
    it(`keeps a 1 kHz tone's frequency and amplitude from ${fromHz} Hz to 16 kHz`, () => {
      const out = resampleAll(tone(1000, fromHz, 1.0, 0.5), fromHz);
      assert.equal(out.length, 16000);
      const middle = out.subarray(2000, 14000); // away from the edges, where the input starts/stops
      assert.ok(Math.abs(peakFrequency(middle, 16000, 990, 1010, 0.5) - 1000) <= 0.5);
      const { amplitude } = measure(middle, 1000, 16000);
      assert.ok(Math.abs(amplitude - 0.5) < 0.5 * 0.001, `amplitude ${amplitude}`);
    });
  }

  it('is time-aligned: the output equals the ideal 16 kHz tone sample by sample', () => {
    for (const fromHz of [48000, 44100, 22050]) {
      const out = resampleAll(tone(440, fromHz, 0.5, 0.8), fromHz);
      const ideal = tone(440, 16000, 0.5, 0.8);
      let worst = 0;
      for (let i = 1000; i < out.length - 1000; i++) worst = Math.max(worst, Math.abs(out[i] - ideal[i]));
      assert.ok(worst < 1e-4, `${fromHz}: worst error ${worst}`);
    }
  });

  it('keeps speech-band tones (300 Hz .. 7 kHz) within 0.01 dB', () => {
    for (const f of [300, 3400, 7000]) {
      const out = resampleAll(tone(f, 48000, 0.5, 0.5), 48000).subarray(1000, 7000);
      const { amplitude } = measure(out, f, 16000);
      assert.ok(Math.abs(20 * Math.log10(amplitude / 0.5)) < 0.01, `${f} Hz: ${amplitude}`);
    }
  });

  for (const [fromHz, f] of [
    [48000, 9000],
    [48000, 12000],
    [44100, 10000],
    [44100, 15000],
  ]) {
    it(`attenuates a ${f / 1000} kHz tone (above the 8 kHz Nyquist) from ${fromHz} Hz by more than 70 dB`, () => {
      const out = resampleAll(tone(f, fromHz, 0.5, 0.9), fromHz);
      const ratio = rms(out.subarray(1000, out.length - 1000)) / (0.9 / Math.SQRT2);
      assert.ok(20 * Math.log10(ratio) < -70, `${f} Hz from ${fromHz}: ${(20 * Math.log10(ratio)).toFixed(1)} dB`);
    });
  }

  it('gives bit-identical output when the input comes in odd chunk sizes', () => {
    for (const fromHz of [44100, 48000, 22050]) {
      const input = new Float32Array(fromHz);
      for (let i = 0; i < input.length; i++) input[i] = Math.sin(i * 0.01) * 0.3 + Math.sin(i * 0.37) * 0.2;
      const whole = resampleAll(input, fromHz);
      const r = new Resampler(fromHz, 16000);
      const parts = [];
      const sizes = [1, 7, 128, 127, 3, 1000, 4096, 2, 333];
      let at = 0;
      for (let k = 0; at < input.length; k++) {
        const n = sizes[k % sizes.length];
        parts.push(r.process(input.subarray(at, at + n)));
        at += n;
      }
      parts.push(r.flush());
      const streamed = concat(parts);
      assert.equal(streamed.length, whole.length);
      assert.deepEqual(streamed, whole);
    }
  });

  it('produces round(n * out / in) samples in total and never drifts', () => {
    for (const [fromHz, n] of [
      [44100, 441],
      [44100, 100003],
      [48000, 47999],
      [8000, 123],
    ]) {
      const out = resampleAll(new Float32Array(n), fromHz);
      assert.equal(out.length, Math.round((n * 16000) / fromHz), `${fromHz} Hz, ${n} samples`);
    }
  });

  it('handles rates with no small common divisor (interpolated filter table)', () => {
    const out = resampleAll(tone(1000, 44056, 0.5, 0.5), 44056);
    assert.equal(out.length, 8000);
    const { amplitude } = measure(out.subarray(1000, 7000), 1000, 16000);
    assert.ok(Math.abs(amplitude - 0.5) < 0.001, `amplitude ${amplitude}`);
  });

  it('upsamples 8 kHz to 16 kHz without imaging', () => {
    const out = resampleAll(tone(1000, 8000, 0.5, 0.5), 8000);
    assert.equal(out.length, 8000);
    const middle = out.subarray(1000, 7000);
    assert.ok(Math.abs(measure(middle, 1000, 16000).amplitude - 0.5) < 0.001);
    assert.ok(measure(middle, 7000, 16000).amplitude < 0.5e-3, 'image at 8000 - 1000 Hz');
  });

  it('rejects non-integer or out-of-range rates', () => {
    assert.throws(() => new Resampler(44100.5, 16000), RangeError);
    assert.throws(() => new Resampler(0, 16000), RangeError);
    assert.throws(() => new Resampler(48000, 16000, { attenuationDb: 10 }), RangeError);
  });

  it('refuses input after flush()', () => {
    const r = new Resampler(48000);
    r.flush();
    assert.throws(() => r.process(new Float32Array(10)), /after flush/);
  });
});

describe('floatToInt16', () => {
  it('scales, rounds and clips', () => {
    const out = floatToInt16([0, 0.5, -0.5, 1, -1, 1.5, -1.5, 1e-6, NaN, -0]);
    assert.deepEqual(Array.from(out), [0, 16384, -16384, 32767, -32768, 32767, -32768, 0, 0, 0]);
  });

  it('writes into a given array', () => {
    const target = new Int16Array(2);
    assert.equal(floatToInt16([0.25, -0.25], target), target);
    assert.deepEqual(Array.from(target), [8192, -8192]);
  });
});

describe('Framer', () => {
  it('cuts any chunking into frames of exactly frameSamples, then a short last frame', () => {
    const framer = new Framer(800);
    const frames = [];
    let total = 0;
    for (const n of [100, 799, 1, 2000, 37]) {
      frames.push(...framer.push(new Float32Array(n).fill(0.1)));
      total += n;
    }
    assert.ok(frames.every((f) => f.length === 800));
    assert.equal(frames.length, Math.floor(total / 800));
    const last = framer.flush();
    assert.equal(last.length, total % 800);
    assert.equal(framer.flush(), null);
  });

  it('keeps sample order across frame boundaries and gives each frame its own buffer', () => {
    const framer = new Framer(4);
    const frames = [...framer.push([0.1, 0.2, 0.3]), ...framer.push([0.4, 0.5, 0.6, 0.7, 0.8, 0.9])];
    assert.equal(frames.length, 2);
    assert.notEqual(frames[0].buffer, frames[1].buffer);
    assert.deepEqual(
      [...frames[0], ...frames[1], ...framer.flush()],
      Array.from(floatToInt16([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])),
    );
  });

  it('clips out-of-range samples to the Int16 limits', () => {
    const framer = new Framer(3);
    assert.deepEqual(Array.from(framer.push([2, -2, 0])[0]), [32767, -32768, 0]);
  });

  it('frameSamplesFor accepts 20..100 ms only', () => {
    assert.equal(frameSamplesFor(20), 320);
    assert.equal(frameSamplesFor(50), 800);
    assert.equal(frameSamplesFor(100), 1600);
    assert.throws(() => frameSamplesFor(10), RangeError);
    assert.throws(() => frameSamplesFor(250), RangeError);
  });
});

describe('helpers', () => {
  it('downmix averages channels', () => {
    assert.deepEqual(Array.from(downmix([new Float32Array([1, 0.5]), new Float32Array([0, -0.5])])), [0.5, 0]);
  });

  it('levelDbfs reads a full-scale sine as about -3 dB and silence as -120', () => {
    assert.ok(Math.abs(levelDbfs(tone(1000, 48000, 0.1, 1)) + 3.01) < 0.05);
    assert.equal(levelDbfs(new Float32Array(100)), -120);
  });
});
