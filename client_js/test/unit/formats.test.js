// Unit tests of the transcript downloads: plain text, SRT and WebVTT (node --test).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { formatTimestamp, toCues, toSrt, toText, toVtt, wrapLines } from '../../formats.js';

const FINALS = [
  { text: 'Good morning everyone.', start: 1.2, end: 2.85, language: 'en', emotion: 'neutral' },
  { text: '', start: 3, end: 3.5 },
  { text: 'Please bring your notebooks.', start: 4.0004, end: 6.5, language: 'en' },
];

describe('formatTimestamp', () => {
  it('formats SRT and WebVTT times, rounding to the millisecond', () => {
    assert.equal(formatTimestamp(0), '00:00:00,000');
    assert.equal(formatTimestamp(1.2345), '00:00:01,235');
    assert.equal(formatTimestamp(59.9996), '00:01:00,000');
    assert.equal(formatTimestamp(3723.5, '.'), '01:02:03.500');
    assert.equal(formatTimestamp(360000), '100:00:00,000');
    assert.equal(formatTimestamp(-3), '00:00:00,000');
  });
});

describe('toSrt', () => {
  it('numbers non-empty finals from 1 with SRT times', () => {
    assert.equal(
      toSrt(FINALS),
      '1\n00:00:01,200 --> 00:00:02,850\nGood morning everyone.\n\n' +
        '2\n00:00:04,000 --> 00:00:06,500\nPlease bring your notebooks.\n',
    );
  });

  it('is empty for no finals', () => {
    assert.equal(toSrt([]), '');
  });

  it('wraps long text at 42 characters, two lines per cue, splitting at word times', () => {
    const words = 'one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty'
      .split(' ')
      .map((word, i) => ({ word, punctuated_word: word, start: 10 + i * 0.5, end: 10 + i * 0.5 + 0.4 }));
    const final = { text: words.map((w) => w.word).join(' '), start: 10, end: 20, words };
    const cues = toCues([final]);
    assert.ok(cues.length >= 2);
    for (const cue of cues) {
      assert.ok(cue.lines.length <= 2);
      assert.ok(cue.lines.every((line) => line.length <= 42));
    }
    assert.equal(cues.map((c) => c.text).join(' '), final.text);
    assert.equal(cues[0].start, 10);
    assert.equal(cues.at(-1).end, 19.9);
    for (let i = 1; i < cues.length; i++) assert.ok(cues[i].start >= cues[i - 1].end);
  });

  it('splits long text without word times in proportion to its length', () => {
    const text = 'a'.repeat(40) + ' ' + 'b'.repeat(40) + ' ' + 'c'.repeat(40);
    const cues = toCues([{ text, start: 0, end: 12 }]);
    assert.equal(cues.length, 2);
    assert.equal(cues[0].start, 0);
    assert.ok(Math.abs(cues.at(-1).end - 12) < 1e-9);
    assert.ok(cues[1].start >= cues[0].end);
  });

  it('orders cues by time and removes overlaps, keeping every cue longer than zero', () => {
    const cues = toCues([
      { text: 'second', start: 5, end: 7 },
      { text: 'first', start: 1, end: 6 },
      { text: 'instant', start: 8, end: 8 },
    ]);
    assert.deepEqual(
      cues.map((c) => c.text),
      ['first', 'second', 'instant'],
    );
    assert.equal(cues[0].end, 5);
    assert.ok(cues[2].end > cues[2].start);
  });

  it('never lets an arrow in the text break the cue timing line', () => {
    assert.ok(!toSrt([{ text: 'a --> b', start: 0, end: 1 }]).split('\n')[2].includes('-->'));
  });
});

describe('toVtt', () => {
  it('writes a WEBVTT header, dotted times and escaped text', () => {
    assert.equal(
      toVtt([{ text: 'Fish & <chips>', start: 0.5, end: 1.25 }]),
      'WEBVTT\n\n00:00:00.500 --> 00:00:01.250\nFish &amp; &lt;chips&gt;\n',
    );
  });

  it('is a bare header for no finals', () => {
    assert.equal(toVtt([]), 'WEBVTT\n');
  });
});

describe('toText', () => {
  it('writes one line per final with its start time', () => {
    assert.equal(toText(FINALS), '[00:00:01] Good morning everyone.\n[00:00:04] Please bring your notebooks.\n');
  });

  it('can leave times out and add language and emotion', () => {
    assert.equal(
      toText(FINALS, { timestamps: false, tags: true }),
      'Good morning everyone. (en, neutral)\nPlease bring your notebooks. (en)\n',
    );
  });
});

describe('wrapLines', () => {
  it('breaks at spaces and gives an over-long word its own line', () => {
    assert.deepEqual(wrapLines('aa bb cc', 5), ['aa bb', 'cc']);
    assert.deepEqual(wrapLines('x ' + 'y'.repeat(10) + ' z', 5), ['x', 'y'.repeat(10), 'z']);
  });
});
