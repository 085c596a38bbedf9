// AudioWorklet processor: microphone audio at the context's rate (44.1 or 48 kHz, whatever the device
// runs at) -> 16 kHz mono Int16 frames, posted to the main thread as transferable buffers.
//
// Loaded by MicrophoneSource with audioWorklet.addModule(); `sampleRate`, `AudioWorkletProcessor` and
// `registerProcessor` are globals of the AudioWorkletGlobalScope.

import { Framer, Resampler, downmix } from './dsp.js';

const LEVEL_INTERVAL_S = 0.05;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { frameSamples, targetRateHz } = options.processorOptions;
    this.resampler = new Resampler(Math.round(sampleRate), targetRateHz);
    this.framer = new Framer(frameSamples);
    this.levelSum = 0;
    this.levelCount = 0;
    this.done = false;
    this.port.onmessage = ({ data }) => {
      if (data.type === 'flush') this.flush();
    };
  }

  post(frames) {
    for (const frame of frames) this.port.postMessage({ type: 'frame', samples: frame }, [frame.buffer]);
  }

  flush() {
    if (this.done) return;
    this.done = true;
    this.post(this.framer.push(this.resampler.flush()));
    const last = this.framer.flush();
    if (last) this.post([last]);
    this.port.postMessage({ type: 'flushed' });
  }

  process(inputs) {
    if (this.done) return false;
    const input = inputs[0];
    if (input && input.length > 0) {
      const mono = downmix(input);
      this.post(this.framer.push(this.resampler.process(mono)));
      for (let i = 0; i < mono.length; i++) this.levelSum += mono[i] * mono[i];
      this.levelCount += mono.length;
      if (this.levelCount >= LEVEL_INTERVAL_S * sampleRate) {
        const rms = Math.sqrt(this.levelSum / this.levelCount);
        this.port.postMessage({ type: 'level', dbfs: rms > 1e-6 ? Math.max(-120, 20 * Math.log10(rms)) : -120 });
        this.levelSum = 0;
        this.levelCount = 0;
      }
    }
    return true;
  }
}

registerProcessor('stream-capture', CaptureProcessor);
