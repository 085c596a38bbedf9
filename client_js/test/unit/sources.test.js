// Unit tests of the parts of sources.js that need no browser (node --test).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { microphoneError, wavSampleRate } from '../../sources.js';

function wavHeader(rateHz, { extraChunk = false } = {}) {
  const parts = [];
  const chunk = (id, body) => {
    const head = Buffer.alloc(8);
    head.write(id, 0, 'ascii');
    head.writeUInt32LE(body.length, 4);
    parts.push(head, body, body.length % 2 ? Buffer.alloc(1) : Buffer.alloc(0));
  };
  if (extraChunk) chunk('LIST', Buffer.from('INFOxyz'));
  const fmt = Buffer.alloc(16);
  fmt.writeUInt16LE(1, 0); // PCM
  fmt.writeUInt16LE(1, 2); // mono
  fmt.writeUInt32LE(rateHz, 4);
  fmt.writeUInt32LE(rateHz * 2, 8);
  fmt.writeUInt16LE(2, 12);
  fmt.writeUInt16LE(16, 14);
  chunk('fmt ', fmt);
  chunk('data', Buffer.alloc(4));
  const body = Buffer.concat(parts);
  const riff = Buffer.alloc(12);
  riff.write('RIFF', 0, 'ascii');
  riff.writeUInt32LE(body.length + 4, 4);
  riff.write('WAVE', 8, 'ascii');
  return new Uint8Array(Buffer.concat([riff, body]));
}

describe('wavSampleRate', () => {
  it('reads the rate from the fmt chunk, after other chunks too', () => {
    assert.equal(wavSampleRate(wavHeader(16000)), 16000);
    assert.equal(wavSampleRate(wavHeader(44100, { extraChunk: true }).buffer), 44100);
  });

  it('is null for anything that is not RIFF/WAVE', () => {
    assert.equal(wavSampleRate(new Uint8Array([0xff, 0xfb, 0x90, 0x00])), null);
    assert.equal(wavSampleRate(new TextEncoder().encode('OggS....................')), null);
  });
});

describe('microphoneError', () => {
  it('turns getUserMedia failures into messages a person can act on', () => {
    const denied = microphoneError(Object.assign(new Error('Permission denied'), { name: 'NotAllowedError' }));
    assert.equal(denied.code, 'MICROPHONE_DENIED');
    assert.match(denied.message, /refused/);
    assert.equal(microphoneError({ name: 'NotFoundError' }).code, 'MICROPHONE_NOT_FOUND');
    assert.equal(microphoneError({ name: 'NotReadableError' }).code, 'MICROPHONE_BUSY');
    assert.equal(microphoneError(new Error('odd')).code, 'MICROPHONE_FAILED');
  });
});
