// Transcript downloads: plain text, SubRip (SRT) and WebVTT, from the finals LiveTranscriber keeps.
//
// A final is {text, start, end, words?: [{punctuated_word|word, start, end}], language?, emotion?}
// with times in seconds on the session timeline. Pure functions: unit-tested under node.

/**
 * "HH:MM:SS,mmm" (SRT) or "HH:MM:SS.mmm" (WebVTT); hours grow past 99 when needed.
 * @param {number} seconds non-negative
 * @param {',' | '.'} [separator]
 */
export function formatTimestamp(seconds, separator = ',') {
  const totalMs = Math.max(0, Math.round(seconds * 1000));
  const ms = totalMs % 1000;
  const totalS = Math.floor(totalMs / 1000);
  const s = totalS % 60;
  const m = Math.floor(totalS / 60) % 60;
  const h = Math.floor(totalS / 3600);
  const two = (n) => String(n).padStart(2, '0');
  return `${two(h)}:${two(m)}:${two(s)}${separator}${String(ms).padStart(3, '0')}`;
}

/** Break `text` into lines of at most `maxChars` at spaces (a longer word gets a line of its own). */
export function wrapLines(text, maxChars) {
  const lines = [];
  let line = '';
  for (const word of text.split(/\s+/).filter(Boolean)) {
    if (line && line.length + 1 + word.length > maxChars) {
      lines.push(line);
      line = word;
    } else {
      line = line ? `${line} ${word}` : word;
    }
  }
  if (line) lines.push(line);
  return lines;
}

function wordText(word) {
  return String(word.punctuated_word ?? word.word ?? '').trim();
}

/**
 * Subtitle cues from finals: one cue per final, split at word boundaries when its text needs more
 * than `maxLines` lines of `maxLineChars` (using word times when the server sent them, else times in
 * proportion to length). Cues are in time order, never overlap, and each lasts at least 1 ms.
 * @param {Array<object>} finals
 * @param {{maxLineChars?: number, maxLines?: number}} [options]
 * @returns {Array<{start: number, end: number, text: string, lines: string[]}>}
 */
export function toCues(finals, { maxLineChars = 42, maxLines = 2 } = {}) {
  const budget = maxLineChars * maxLines;
  const cues = [];
  const sorted = finals
    .filter((f) => String(f.text ?? '').trim())
    .slice()
    .sort((a, b) => a.start - b.start);
  for (const final of sorted) {
    const text = String(final.text).trim().replace(/\s+/g, ' ');
    const fits = (t) => wrapLines(t, maxLineChars).length <= maxLines;
    if (fits(text)) {
      cues.push({ start: final.start, end: final.end, text });
      continue;
    }
    const words = (final.words ?? []).filter((w) => wordText(w));
    const timed = words.length > 0 && words.map(wordText).join(' ') === text;
    const tokens = timed
      ? words.map((w) => ({ text: wordText(w), start: w.start, end: w.end }))
      : text.split(' ').map((t) => ({ text: t, start: null, end: null }));
    // Greedy: fill each cue up to the line budget.
    const groups = [];
    let group = [];
    for (const token of tokens) {
      const candidate = [...group, token].map((t) => t.text).join(' ');
      if (group.length && (!fits(candidate) || candidate.length > budget)) {
        groups.push(group);
        group = [token];
      } else {
        group.push(token);
      }
    }
    if (group.length) groups.push(group);
    const totalChars = groups.reduce((n, g) => n + g.map((t) => t.text).join(' ').length, 0);
    let cursor = final.start;
    for (const g of groups) {
      const groupText = g.map((t) => t.text).join(' ');
      let start;
      let end;
      if (timed) {
        start = g[0].start;
        end = g[g.length - 1].end;
      } else {
        start = cursor;
        end = cursor + ((final.end - final.start) * groupText.length) / totalChars;
        cursor = end;
      }
      cues.push({ start, end, text: groupText });
    }
  }
  // Time order without overlap.
  for (let i = 0; i < cues.length; i++) {
    const cue = cues[i];
    const previous = cues[i - 1];
    if (previous && cue.start < previous.end) {
      if (previous.end - 0.001 > previous.start) previous.end = Math.max(previous.start + 0.001, cue.start);
      cue.start = Math.max(cue.start, previous.end);
    }
    cue.start = Math.max(0, cue.start);
    if (!(cue.end > cue.start)) cue.end = cue.start + 0.001;
  }
  return cues.map((cue) => ({ ...cue, lines: wrapLines(cue.text, maxLineChars) }));
}

/**
 * SubRip subtitles.
 * @param {Array<object>} finals
 * @param {{maxLineChars?: number, maxLines?: number}} [options]
 */
export function toSrt(finals, options) {
  return toCues(finals, options)
    .map((cue, i) => {
      const lines = cue.lines.map((line) => line.replace(/-->/g, '->'));
      return `${i + 1}\n${formatTimestamp(cue.start, ',')} --> ${formatTimestamp(cue.end, ',')}\n${lines.join('\n')}\n`;
    })
    .join('\n');
}

function escapeVtt(text) {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/**
 * WebVTT subtitles.
 * @param {Array<object>} finals
 * @param {{maxLineChars?: number, maxLines?: number}} [options]
 */
export function toVtt(finals, options) {
  const cues = toCues(finals, options).map(
    (cue) =>
      `${formatTimestamp(cue.start, '.')} --> ${formatTimestamp(cue.end, '.')}\n${cue.lines.map(escapeVtt).join('\n')}\n`,
  );
  return ['WEBVTT\n', ...cues].join('\n');
}

/**
 * Plain text, one final per line, each prefixed with its start time "[HH:MM:SS]" unless
 * `timestamps` is false; `tags` appends the detected language and emotion when present.
 * @param {Array<object>} finals
 * @param {{timestamps?: boolean, tags?: boolean}} [options]
 */
export function toText(finals, { timestamps = true, tags = false } = {}) {
  const lines = finals
    .filter((f) => String(f.text ?? '').trim())
    .slice()
    .sort((a, b) => a.start - b.start)
    .map((f) => {
      const stamp = timestamps ? `[${formatTimestamp(f.start).slice(0, 8)}] ` : '';
      const extra = tags ? [f.language, f.emotion].filter(Boolean) : [];
      return `${stamp}${String(f.text).trim()}${extra.length ? ` (${extra.join(', ')})` : ''}`;
    });
  return lines.length ? `${lines.join('\n')}\n` : '';
}
