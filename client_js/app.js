// The live-captions page served at GET / (index.html). Wires LiveTranscriber to the DOM.
//
// Query parameters: ?server=ws://host:port points the page at another server (default: the one that
// served it); ?token_url=URL names where to get a short-lived token before every connection, for a
// server with API keys (README, "Authentication"); ?language=en preselects a language; ?contrast=1
// starts in the high-contrast theme. ?call=CA... follows a live phone call instead of capturing audio
// (?inbound_label= / ?outbound_label= name its two speakers); ?calls lists the live calls.

import {
  FileSource,
  LiveTranscriber,
  MicrophoneSource,
  defaultListenUrl,
  formatTimestamp,
  healthUrlFor,
  toSrt,
  toText,
  toVtt,
} from './stream-client.js';

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const HEALTH_POLL_MS = 10000;
const CAPTION_LINES = 4;

const LANGUAGE_NAMES = { en: 'English', zh: 'Chinese', yue: 'Cantonese', ja: 'Japanese', ko: 'Korean', auto: 'Auto' };
const EMOTIONS = {
  happy: '😊 happy',
  sad: '😢 sad',
  angry: '😠 angry',
  neutral: '😐 neutral',
  fearful: '😨 fearful',
  disgusted: '🤢 disgusted',
  surprised: '😮 surprised',
};
const AUDIO_EVENTS = { bgm: '🎵 music', applause: '👏 applause', laughter: '😄 laughter', cry: '😭 crying', cough: 'cough', sneeze: 'sneeze' };

function listenUrl() {
  const server = query.get('server');
  if (!server) return defaultListenUrl(location.href);
  const url = new URL(server, location.href);
  if (url.protocol === 'http:') url.protocol = 'ws:';
  if (url.protocol === 'https:') url.protocol = 'wss:';
  if (!/\/v1\/listen\/?$/.test(url.pathname)) url.pathname = `${url.pathname.replace(/\/?$/, '/')}v1/listen`;
  return url.href;
}

const LISTEN_URL = listenUrl();
const HEALTH_URL = healthUrlFor(LISTEN_URL);
// The page never holds an API key: ?token_url= names an endpoint of the operator's (beside the page,
// behind its login) that answers POST with {"access_token": ...}, as the server's own
// POST /v1/auth/grant does for whoever holds a key.
const CALL_SID = query.get('call') || null;
const SPEAKERS = { inbound: query.get('inbound_label') || 'Caller', outbound: query.get('outbound_label') || 'Agent' };
const TOKEN_URL = query.get('token_url') ? new URL(query.get('token_url'), location.href).href : null;
const AUTH_HELP =
  'This server requires a token. Open this page with ?token_url= naming an endpoint that hands out ' +
  'short-lived tokens (POST, answering {"access_token": …}); see the README, "Authentication".';

/** A fresh token from TOKEN_URL (called before every connection attempt, reconnects included). */
async function fetchToken() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 8000);
  try {
    let response;
    try {
      response = await fetch(TOKEN_URL, { method: 'POST', cache: 'no-store', signal: controller.signal });
    } catch {
      throw new Error(`the token endpoint ${TOKEN_URL} is not reachable`);
    }
    if (!response.ok) throw new Error(`the token endpoint ${TOKEN_URL} answered HTTP ${response.status}`);
    const body = await response.json().catch(() => ({}));
    if (typeof body.access_token !== 'string' || !body.access_token) {
      throw new Error(`the token endpoint ${TOKEN_URL} answered without an access_token`);
    }
    return body.access_token;
  } finally {
    clearTimeout(timer);
  }
}

const ui = {
  state: $('state'),
  latency: $('latency'),
  model: $('model'),
  fallback: $('fallback-banner'),
  message: $('message'),
  messageText: $('message-text'),
  captions: $('captions'),
  placeholder: $('placeholder'),
  transcript: $('transcript'),
  transcriptEmpty: $('transcript-empty'),
  start: $('start'),
  stop: $('stop'),
  pause: $('pause'),
  levelBar: $('level-bar'),
  fileInput: $('file-input'),
  monitorLabel: $('monitor-label'),
  monitor: $('monitor'),
  language: $('language'),
  contrast: $('contrast'),
};

const app = {
  transcriber: null,
  archive: [], // finals of earlier runs, on one continuous timeline
  archiveOffsetS: 0,
  runOffsetS: 0,
  captionFinals: [],
  interim: '',
  health: null,
  authWarned: false,
  callFinals: [], // a followed call's finals, {text, start, end, track, ...}, in time order
  callInterims: {}, // track -> the open segment's text
  wakeLock: null,
};
window.captionsApp = app; // for debugging from the console

// --------------------------------------------------------------------------------------------------
// Preferences

const prefs = {
  get(key, fallback) {
    try {
      return localStorage.getItem(`captions.${key}`) ?? fallback;
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(`captions.${key}`, String(value));
    } catch {
      // private mode: preferences simply do not persist
    }
  },
};

function applyContrast(on) {
  document.documentElement.dataset.theme = on ? 'contrast' : '';
  ui.contrast.checked = on;
  prefs.set('contrast', on ? '1' : '0');
}

function applyScale(scale) {
  const value = Math.min(2.5, Math.max(0.6, scale));
  document.documentElement.style.setProperty('--caption-scale', String(value));
  prefs.set('scale', value.toFixed(2));
  return value;
}

let captionScale = applyScale(Number(prefs.get('scale', '1')) || 1);
applyContrast(query.get('contrast') === '1' || prefs.get('contrast', '0') === '1');
ui.contrast.addEventListener('change', () => applyContrast(ui.contrast.checked));
$('smaller').addEventListener('click', () => (captionScale = applyScale(captionScale - 0.15)));
$('larger').addEventListener('click', () => (captionScale = applyScale(captionScale + 0.15)));
$('fullscreen').addEventListener('click', () => {
  if (document.fullscreenElement) document.exitFullscreen?.();
  else $('stage').requestFullscreen?.().catch(() => {});
});

// --------------------------------------------------------------------------------------------------
// Messages

let messageTimer = null;

/** Show a message; kind is error (stays), warning (stays) or info (fades after 8 s). */
function showMessage(kind, text) {
  clearTimeout(messageTimer);
  ui.message.dataset.kind = kind;
  ui.messageText.textContent = text;
  ui.message.hidden = false;
  if (kind === 'info') messageTimer = setTimeout(clearMessage, 8000);
}

function clearMessage() {
  clearTimeout(messageTimer);
  ui.message.hidden = true;
  ui.messageText.textContent = '';
}

$('message-close').addEventListener('click', clearMessage);

// --------------------------------------------------------------------------------------------------
// Server health

function describeModel(model) {
  const languages = model.languages?.length ? model.languages.join(', ') : 'auto';
  return `${model.name} · ${model.device}${model.dtype ? ` · ${model.dtype}` : ''} · ${languages}`;
}

async function checkHealth() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 4000);
  try {
    const response = await fetch(HEALTH_URL, { cache: 'no-store', signal: controller.signal });
    const body = await response.json();
    app.health = body;
    if (body.model) {
      ui.model.textContent = '';
      const label = document.createElement('strong');
      label.textContent = 'Model ';
      ui.model.append(label, describeModel(body.model));
      fillLanguages(body.model.languages ?? []);
      if (body.model.fallback) {
        const english = body.model.languages?.length === 1 ? ` (${LANGUAGE_NAMES[body.model.languages[0]] ?? body.model.languages[0]} only)` : '';
        ui.fallback.textContent =
          `⚠ FALLBACK MODEL RUNNING: ${body.model.name}${english}. ` +
          (body.model.fallback_reason ?? 'The server could not load its main model.');
        ui.fallback.hidden = false;
      } else {
        ui.fallback.hidden = true;
      }
    }
    if (body.auth_required && !TOKEN_URL && !app.authWarned) {
      app.authWarned = true;
      showMessage('warning', AUTH_HELP);
    }
    if (!body.ready) {
      const why = body.status === 'loading' ? 'the server is loading its model' : body.status === 'draining' ? 'the server is shutting down' : `the server is not ready (${body.status}${body.error ? `: ${body.error}` : ''})`;
      ui.model.textContent = `Not ready: ${why}`;
    }
    return body;
  } catch {
    app.health = null;
    ui.model.textContent = `Server unreachable at ${new URL(HEALTH_URL).host}`;
    return null;
  } finally {
    clearTimeout(timer);
  }
}

function fillLanguages(languages) {
  const wanted = query.get('language') ?? prefs.get('language', 'auto');
  const current = ui.language.value || wanted;
  const options = ['auto', ...languages.filter((l) => l !== 'auto')];
  if ([...ui.language.options].map((o) => o.value).join() === options.join()) return;
  ui.language.textContent = '';
  for (const code of options) {
    const option = document.createElement('option');
    option.value = code;
    option.textContent = code === 'auto' ? 'Auto-detect' : `${LANGUAGE_NAMES[code] ?? code} (${code})`;
    ui.language.append(option);
  }
  ui.language.value = options.includes(current) ? current : options.includes(wanted) ? wanted : 'auto';
}

ui.language.addEventListener('change', () => prefs.set('language', ui.language.value));
$('server-address').textContent = `Server ${LISTEN_URL}`;
checkHealth();
setInterval(() => {
  if (!app.transcriber || ['idle', 'closed', 'failed'].includes(app.transcriber.state)) checkHealth();
}, HEALTH_POLL_MS);

// --------------------------------------------------------------------------------------------------
// Source selection

function sourceKind() {
  return document.querySelector('input[name="source"]:checked').value;
}

function showSourceControls() {
  const file = sourceKind() === 'file';
  ui.fileInput.hidden = !file;
  ui.monitorLabel.hidden = !file;
  prefs.set('source', sourceKind());
}

for (const radio of document.querySelectorAll('input[name="source"]')) radio.addEventListener('change', showSourceControls);
if (prefs.get('source', 'mic') === 'file') $('source-file').checked = true;
ui.monitor.checked = prefs.get('monitor', '1') === '1';
ui.monitor.addEventListener('change', () => prefs.set('monitor', ui.monitor.checked ? '1' : '0'));
showSourceControls();

// --------------------------------------------------------------------------------------------------
// Captions and transcript

function allFinals() {
  if (CALL_SID) return app.callFinals;
  const current = app.transcriber ? app.transcriber.finals.map((f) => shift(f, app.runOffsetS)) : [];
  return [...app.archive, ...current];
}

function shift(final, offsetS) {
  if (!offsetS) return final;
  return {
    ...final,
    start: final.start + offsetS,
    end: final.end + offsetS,
    words: final.words?.map((w) => ({ ...w, start: w.start + offsetS, end: w.end + offsetS })),
  };
}

function renderCaptions() {
  ui.captions.textContent = '';
  const lines = CALL_SID ? app.callFinals.slice(-CAPTION_LINES) : app.captionFinals.slice(-CAPTION_LINES);
  if (!lines.length && !app.interim && !Object.values(app.callInterims).some(Boolean)) {
    ui.captions.append(ui.placeholder);
    return;
  }
  lines.forEach((line, i) => {
    const p = document.createElement('p');
    p.className = i < lines.length - 1 ? 'line final old' : 'line final';
    setLine(p, line);
    ui.captions.append(p);
  });
  const interims = CALL_SID ? Object.entries(app.callInterims).filter(([, text]) => text) : app.interim ? [[null, app.interim]] : [];
  for (const [track, text] of interims) {
    const p = document.createElement('p');
    p.className = 'line interim';
    setLine(p, track ? { text, track } : text);
    ui.captions.append(p);
  }
}

/** A caption line's content: plain text, or a call's {text, track} with its speaker's label first. */
function setLine(element, line) {
  if (typeof line === 'string') {
    element.textContent = line;
    return;
  }
  const speaker = document.createElement('strong');
  speaker.className = `speaker speaker-${line.track}`;
  speaker.textContent = SPEAKERS[line.track] ?? line.track;
  element.append(speaker, ` ${line.text}`);
}

function addTranscriptItem(final, before = null) {
  const li = document.createElement('li');
  const time = document.createElement('time');
  time.textContent = formatTimestamp(final.start).slice(0, 8);
  time.dateTime = `PT${final.start.toFixed(2)}S`;
  const text = document.createElement('span');
  text.className = 'text';
  if (final.track) setLine(text, final);
  else text.textContent = final.text;
  const tags = document.createElement('span');
  tags.className = 'tags';
  const tag = (label, title) => {
    const span = document.createElement('span');
    span.className = 'tag';
    span.textContent = label;
    if (title) span.title = title;
    tags.append(span);
  };
  if (final.language) tag(LANGUAGE_NAMES[final.language] ?? final.language, 'Detected language');
  const emotion = final.emotion ? String(final.emotion).toLowerCase() : null;
  if (emotion && EMOTIONS[emotion]) tag(EMOTIONS[emotion], 'Detected emotion');
  const event = final.audioEvent ? String(final.audioEvent).toLowerCase() : null;
  if (event && AUDIO_EVENTS[event]) tag(AUDIO_EVENTS[event], 'Detected sound');
  if (final.latencyMs !== null && final.latencyMs !== undefined) tag(`${(final.latencyMs / 1000).toFixed(2)} s`, 'Latency of this final');
  li.append(time, text, tags);
  ui.transcript.insertBefore(li, before);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  ui.transcriptEmpty.hidden = true;
}

function refreshDownloads() {
  const any = allFinals().length > 0;
  for (const id of ['download-txt', 'download-srt', 'download-vtt', 'clear']) $(id).disabled = !any;
}

function download(kind) {
  // A call's exports name the speaker on every line ("Caller: …"); word times would no longer match.
  const finals = allFinals().map((f) => (f.track ? { ...f, text: `${SPEAKERS[f.track] ?? f.track}: ${f.text}`, words: undefined } : f));
  const stamp = new Date().toISOString().slice(0, 16).replace(/[-:]/g, '').replace('T', '-');
  const files = {
    txt: [toText(finals, { tags: true }), 'text/plain'],
    srt: [toSrt(finals), 'application/x-subrip'],
    vtt: [toVtt(finals), 'text/vtt'],
  };
  const [content, type] = files[kind];
  const url = URL.createObjectURL(new Blob([content], { type: `${type};charset=utf-8` }));
  const a = document.createElement('a');
  a.href = url;
  a.download = `${CALL_SID ? `call-${CALL_SID}` : 'captions'}-${stamp}.${kind}`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

$('download-txt').addEventListener('click', () => download('txt'));
$('download-srt').addEventListener('click', () => download('srt'));
$('download-vtt').addEventListener('click', () => download('vtt'));
$('clear').addEventListener('click', () => {
  if (app.transcriber && !['closed', 'failed', 'idle'].includes(app.transcriber.state)) return;
  app.archive = [];
  app.archiveOffsetS = 0;
  app.transcriber = null;
  app.captionFinals = [];
  app.callFinals = [];
  app.interim = '';
  ui.transcript.textContent = '';
  ui.transcriptEmpty.hidden = false;
  renderCaptions();
  refreshDownloads();
});

// --------------------------------------------------------------------------------------------------
// Connection state

const STATE_TEXT = {
  idle: 'Idle',
  starting: 'Starting…',
  connecting: 'Connecting…',
  open: 'Live',
  reconnecting: 'Reconnecting…',
  closing: 'Finishing…',
  closed: 'Stopped',
  failed: 'Failed',
};

function showState(detail) {
  const t = app.transcriber;
  let text = STATE_TEXT[detail.state] ?? detail.state;
  let state = detail.state;
  if (detail.state === 'starting' && sourceKind() === 'mic') text = 'Starting microphone… allow access if asked';
  if (detail.state === 'connecting' && detail.attempt > 1) text = `Connecting… (attempt ${detail.attempt} of ${detail.maxAttempts})`;
  if (detail.state === 'reconnecting') text = `${detail.everOpened ? 'Reconnecting' : 'Retrying'} in ${(detail.delayMs / 1000).toFixed(1)} s (attempt ${detail.attempt} of ${detail.maxAttempts})`;
  if (detail.state === 'open' && t?.paused) {
    text = 'Muted';
    state = 'paused';
  }
  ui.state.dataset.state = state;
  ui.state.textContent = text;
  const running = !['idle', 'closed', 'failed'].includes(detail.state);
  ui.start.hidden = running;
  ui.stop.hidden = !running;
  ui.stop.disabled = detail.state === 'closing';
  ui.pause.disabled = !running || detail.state === 'closing';
  ui.pause.textContent = t?.paused ? 'Unmute' : 'Mute';
  for (const input of document.querySelectorAll('input[name="source"], #file-input, #language')) input.disabled = running;
  if (!running) ui.levelBar.style.width = '0';
  if (detail.state === 'open') requestWakeLock();
  else if (!running) releaseWakeLock();
}

async function requestWakeLock() {
  try {
    if (!app.wakeLock && navigator.wakeLock) app.wakeLock = await navigator.wakeLock.request('screen');
  } catch {
    app.wakeLock = null; // not allowed here: the screen may dim, nothing else changes
  }
}

function releaseWakeLock() {
  app.wakeLock?.release?.().catch(() => {});
  app.wakeLock = null;
}

// --------------------------------------------------------------------------------------------------
// Start / stop

function archiveRun() {
  const t = app.transcriber;
  if (!t || t.archived) return;
  t.archived = true;
  app.archive.push(...t.finals.map((f) => shift(f, app.runOffsetS)));
  app.archiveOffsetS = app.runOffsetS + t.audioSeconds;
}

async function start() {
  clearMessage();
  if (app.health?.auth_required && !TOKEN_URL) {
    showMessage('error', AUTH_HELP);
    return;
  }
  let source;
  if (sourceKind() === 'file') {
    const file = ui.fileInput.files?.[0];
    if (!file) {
      showMessage('error', 'Choose an audio file first (or switch the source to Microphone).');
      ui.fileInput.focus();
      return;
    }
    source = new FileSource(file, { monitor: ui.monitor.checked });
  } else {
    source = new MicrophoneSource();
  }
  archiveRun();
  app.source = source;
  const language = ui.language.value || 'auto';
  const transcriber = new LiveTranscriber({
    url: LISTEN_URL,
    params: { interim_results: true, punctuate: true, language },
    getToken: TOKEN_URL ? fetchToken : null,
  });
  app.transcriber = transcriber;
  app.runOffsetS = app.archiveOffsetS;
  app.interim = '';
  const current = () => app.transcriber === transcriber;

  transcriber.addEventListener('state', (e) => current() && showState(e.detail));
  transcriber.addEventListener('level', (e) => {
    if (!current()) return;
    const pct = Math.max(0, Math.min(100, ((e.detail.dbfs + 60) / 60) * 100));
    ui.levelBar.style.width = `${pct.toFixed(0)}%`;
  });
  transcriber.addEventListener('interim', (e) => {
    if (!current()) return;
    app.interim = e.detail.text;
    renderCaptions();
  });
  transcriber.addEventListener('final', (e) => {
    if (!current()) return;
    app.interim = '';
    if (e.detail.stored) {
      const final = shift(e.detail.final, app.runOffsetS);
      app.captionFinals.push(final.text);
      if (app.captionFinals.length > 50) app.captionFinals.splice(0, app.captionFinals.length - 50);
      addTranscriptItem(final);
      refreshDownloads();
    }
    renderCaptions();
  });
  transcriber.addEventListener('latency', (e) => {
    if (!current()) return;
    const { ms, average } = e.detail;
    ui.latency.textContent = `Latency ${(ms / 1000).toFixed(2)} s · avg ${(average / 1000).toFixed(2)} s`;
  });
  transcriber.addEventListener('open', (e) => {
    if (!current()) return;
    if (e.detail.connection > 1) {
      const resent = e.detail.replayedSeconds > 0 ? ` Resent ${e.detail.replayedSeconds.toFixed(1)} s of audio that had no final yet.` : '';
      showMessage('info', `Reconnected to the server.${resent}`);
    }
  });
  transcriber.addEventListener('gap', (e) => {
    if (current()) showMessage('warning', `${e.detail.totalSeconds.toFixed(1)} s of audio could not be transcribed while the connection was down.`);
  });
  transcriber.addEventListener('error', (e) => {
    if (!current()) return;
    const d = e.detail;
    if (d.origin === 'server' && !d.fatal && d.closeCode === undefined) {
      showMessage('warning', `Server warning (${d.code}): ${d.message}`);
      return;
    }
    const prefix = d.origin === 'server' ? `Server error (${d.code}): ` : '';
    showMessage(d.willRetry ? 'warning' : 'error', `${prefix}${d.message}`);
  });
  transcriber.addEventListener('end', (e) => {
    if (!current()) return;
    app.interim = '';
    renderCaptions();
    refreshDownloads();
    if (e.detail.reason === 'source-ended') showMessage('info', `Finished: the file has been transcribed (${transcriber.finals.length} caption${transcriber.finals.length === 1 ? '' : 's'}).`);
  });

  try {
    await transcriber.start(source);
  } catch {
    // already reported through the error event
  }
}

async function stop() {
  ui.stop.disabled = true;
  await app.transcriber?.stop();
}

ui.start.addEventListener('click', start);
ui.stop.addEventListener('click', stop);
ui.pause.addEventListener('click', () => {
  const t = app.transcriber;
  if (!t) return;
  if (t.paused) t.resume();
  else t.pause();
});
window.addEventListener('beforeunload', (event) => {
  if (app.transcriber && !['idle', 'closed', 'failed'].includes(app.transcriber.state)) event.preventDefault();
});

// --------------------------------------------------------------------------------------------------
// Following a call (?call=CA...): GET /v1/calls/{callSid} (README, "Call-centre audio") sends a Call
// message, then the live API's Results with a "twilio" object naming the track, then Metadata and a
// close with 1000 when the call ends. The page only reads from that socket.

function callsUrl(suffix = '') {
  const url = new URL(LISTEN_URL);
  url.pathname = url.pathname.replace(/\/v1\/listen\/?$/, `/v1/calls${suffix}`);
  return url;
}

/** The live calls from GET /v1/calls, or null when the server did not answer with a list. */
async function fetchCalls() {
  const url = callsUrl();
  url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
  try {
    const headers = TOKEN_URL ? { Authorization: `Bearer ${await fetchToken()}` } : {};
    const response = await fetch(url, { cache: 'no-store', headers });
    if (!response.ok) return null;
    return (await response.json()).calls ?? null;
  } catch {
    return null;
  }
}

function showCallState(state, text) {
  ui.state.dataset.state = state;
  ui.state.textContent = text;
}

function trackOf(message) {
  return message.twilio?.track ?? (message.channel_index?.[0] === 1 ? 'outbound' : 'inbound');
}

/** A Results message of the followed call: an interim replaces its track's, a final goes in time order. */
function receiveCallResult(message) {
  const track = trackOf(message);
  const alternative = message.channel?.alternatives?.[0] ?? {};
  const text = String(alternative.transcript ?? '').trim();
  if (!message.is_final) {
    app.callInterims[track] = text;
    renderCaptions();
    return;
  }
  app.callInterims[track] = '';
  if (text) {
    const final = {
      text,
      start: message.start,
      end: message.start + message.duration,
      track,
      speaker: SPEAKERS[track] ?? track,
      language: message.tags?.language ?? alternative.languages?.[0] ?? null,
      emotion: message.tags?.emotion ?? null,
      audioEvent: message.tags?.audio_event ?? null,
    };
    let at = app.callFinals.length;
    while (at > 0 && app.callFinals[at - 1].start > final.start) at--;
    app.callFinals.splice(at, 0, final);
    addTranscriptItem(final, ui.transcript.children[at] ?? null);
    refreshDownloads();
  }
  renderCaptions();
}

async function followCall() {
  const sid = CALL_SID;
  const notFound = `No live call ${sid} on this server (it may have ended). Open this page with ?calls to list the live calls.`;
  showCallState('connecting', 'Connecting…');
  const calls = await fetchCalls();
  if (calls && !calls.some((c) => c.call_sid === sid)) {
    showCallState('failed', 'Not found');
    showMessage('error', notFound);
    return;
  }
  let ws;
  try {
    const url = callsUrl(`/${encodeURIComponent(sid)}`).href;
    ws = TOKEN_URL ? new WebSocket(url, ['bearer', await fetchToken()]) : new WebSocket(url);
  } catch (error) {
    showCallState('failed', 'Failed');
    showMessage('error', `Could not follow call ${sid}: ${error.message}.`);
    return;
  }
  app.callSocket = ws;
  let opened = false;
  let ended = false;
  const end = () => {
    if (ended) return;
    ended = true;
    app.callInterims = {};
    renderCaptions();
    showCallState('closed', 'Call ended');
    const n = app.callFinals.length;
    showMessage('info', `The call has ended (${n} caption${n === 1 ? '' : 's'}).`);
  };
  ws.addEventListener('open', () => {
    opened = true;
    showCallState('open', 'Live call');
  });
  ws.addEventListener('message', (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (message.type === 'Call') {
      const tracks = (message.tracks ?? []).map((t) => SPEAKERS[t] ?? t).join(' and ');
      ui.placeholder.textContent = `Following call ${sid}${tracks ? ` (${tracks})` : ''}: captions appear here.`;
    } else if (message.type === 'Results') {
      receiveCallResult(message);
    } else if (message.type === 'Metadata') {
      end();
    } else if (message.type === 'Error') {
      showMessage('warning', `Server error (${message.code}): ${message.description}`);
    }
  });
  ws.addEventListener('close', async (event) => {
    if (event.code === 1000) return end();
    if (ended) return;
    if (!opened) {
      // The browser hides the refusal's HTTP status: ask the list whether the call is still there.
      if ((app.health ?? (await checkHealth()))?.auth_required && !TOKEN_URL) {
        showCallState('failed', 'Failed');
        showMessage('error', AUTH_HELP);
        return;
      }
      const listed = await fetchCalls();
      if (listed && !listed.some((c) => c.call_sid === sid)) {
        showCallState('failed', 'Not found');
        showMessage('error', notFound);
        return;
      }
    }
    showCallState('failed', 'Disconnected');
    showMessage('error', `The connection to call ${sid} was lost (code ${event.code}${event.reason ? `: ${event.reason}` : ''}). Reload the page to follow it again.`);
  });
}

/** ?calls: the live calls, each a link that follows it (the page's other query parameters kept). */
async function listCalls() {
  ui.callsPanel.hidden = false;
  const calls = await fetchCalls();
  ui.callsList.textContent = '';
  if (!calls) {
    ui.callsEmpty.textContent = 'The server did not list its calls (is it reachable, and is a token needed?).';
    return;
  }
  ui.callsEmpty.textContent = calls.length ? '' : 'No live calls right now.';
  for (const call of calls) {
    const params = new URLSearchParams(location.search);
    params.delete('calls');
    params.set('call', call.call_sid);
    const li = document.createElement('li');
    const a = document.createElement('a');
    a.href = `?${params}`;
    a.textContent = call.call_sid;
    const tracks = (call.tracks ?? []).map((t) => SPEAKERS[t] ?? t).join(' and ');
    li.append(a, ` · ${tracks} · ${Math.round(call.duration ?? 0)} s · ${call.finals ?? 0} finals`);
    ui.callsList.append(li);
  }
}

ui.callsPanel = $('calls-panel');
ui.callsList = $('calls-list');
ui.callsEmpty = $('calls-empty');
if (CALL_SID) {
  document.body.classList.add('following-call');
  ui.placeholder.textContent = `Following call ${CALL_SID}: captions appear here.`;
  document.title = `Call ${CALL_SID} · Live captions`;
  $('title').textContent = 'Call captions';
  followCall();
} else if (query.has('calls')) {
  listCalls();
  $('calls-refresh').addEventListener('click', listCalls);
}

renderCaptions();
refreshDownloads();
