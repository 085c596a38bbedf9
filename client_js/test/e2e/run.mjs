// End-to-end scenarios of the live-captions page in real headless Chromium, driven by
// tests/test_browser.py (which starts the servers) — or by hand:
//
//   node test/e2e/run.mjs '{"scenario": "captions", "base": "http://127.0.0.1:8000", "wav": "/tmp/speech.wav",
//                           "expect": ["morning", "notebooks"]}'
//
// Scenarios: captions (fake microphone plays `wav`), file (the page streams `wav` as a chosen file),
// reconnect (the connection is cut while a sentence is spoken; `cut_when` lists interim words to wait for),
// server-down (`down` is a ws:// address nobody listens on), server-error (`base` is a server that
// ends streams with a fatal error), mic-denied (the permission prompt is refused), auth (`base` is a
// server with the API key `key`: the page is given ?token_url= and this script plays the operator's
// backend, which alone holds the key and asks POST /v1/auth/grant for each token).
//
// Prints one JSON object on stdout: what the page showed (states, captions, transcript, messages,
// downloads, console errors); exit status 0 when the scenario ran to its end, 1 when a wait timed out
// (the JSON then carries `error` and everything seen until then). Nothing is asserted here.

import fs from 'node:fs';

import { launch, scaled, until } from './browser.mjs';

const args = JSON.parse(process.argv[2] ?? '{}');
const out = { scenario: args.scenario, states: [], captions: [], interims: [], messages: [], console: [], timings: {} };
const started = Date.now();
let browser = null;

function finish(code) {
  out.timings.total_ms = Date.now() - started;
  process.stdout.write(`${JSON.stringify(out)}\n`);
  process.exit(code);
}

// Hard limit for the whole script: never hang, report what was seen.
setTimeout(() => {
  out.error = `run.mjs hard limit of ${scaled(args.limit_ms ?? 90000)} ms reached`;
  finish(1);
}, scaled(args.limit_ms ?? 90000)).unref();

async function openPage(context, url, before = async () => {}) {
  const page = await context.newPage();
  await before(page);
  page.on('console', (msg) => {
    if (msg.type() === 'error' || msg.type() === 'warning') out.console.push(`${msg.type()}: ${msg.text()}`);
  });
  page.on('pageerror', (error) => out.console.push(`pageerror: ${error.message}`));
  page.on('response', (response) => {
    if (response.status() >= 400) out.console.push(`http ${response.status()}: ${response.url()}`);
  });
  await page.goto(url, { waitUntil: 'load', timeout: scaled(15000) });
  return page;
}

/** Everything visible that the test checks, in one round trip. */
async function snapshot(page) {
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id)?.textContent?.trim() ?? '';
    const message = document.getElementById('message');
    return {
      state: text('state'),
      stateKey: document.getElementById('state').dataset.state,
      captions: [...document.querySelectorAll('#captions .final')].map((e) => e.textContent),
      interim: document.querySelector('#captions .interim')?.textContent ?? null,
      message: message.hidden ? '' : text('message-text'),
      messageKind: message.hidden ? null : message.dataset.kind,
      transcript: [...document.querySelectorAll('#transcript li')].map((li) => ({
        time: li.querySelector('time')?.textContent ?? '',
        text: li.querySelector('.text')?.textContent ?? '',
        tags: [...li.querySelectorAll('.tag')].map((t) => t.textContent),
      })),
      latency: text('latency'),
      model: text('model'),
      fallback: document.getElementById('fallback-banner').hidden ? '' : text('fallback-banner'),
      inputRateHz: window.captionsApp?.source?.sampleRateHz ?? null,
    };
  });
}

/** Poll the page, recording every new state, caption, interim and message, until `done(snap)`. */
async function watch(page, done, ms, what) {
  let last = null;
  return until(
    async () => {
      const snap = await snapshot(page);
      if (out.states.at(-1) !== snap.state) out.states.push(snap.state);
      for (const c of snap.captions) if (!out.captions.includes(c)) out.captions.push(c);
      if (snap.interim && !out.interims.includes(snap.interim)) out.interims.push(snap.interim);
      if (snap.message && out.messages.at(-1) !== snap.message) out.messages.push(snap.message);
      last = snap;
      out.last = snap;
      return done(snap) ? snap : null;
    },
    ms,
    what,
    150,
  ).catch((error) => {
    out.last = last;
    throw error;
  });
}

async function downloadText(page, buttonId) {
  const [download] = await Promise.all([page.waitForEvent('download', { timeout: scaled(10000) }), page.click(`#${buttonId}`)]);
  const file = await download.path();
  return { name: download.suggestedFilename(), text: fs.readFileSync(file, 'utf8') };
}

function hasWords(transcript, words) {
  const all = transcript.map((t) => t.text).join(' ').toLowerCase();
  return words.every((w) => all.includes(w.toLowerCase()));
}

async function downloads(page) {
  out.srt = await downloadText(page, 'download-srt');
  out.vtt = await downloadText(page, 'download-vtt');
  out.txt = await downloadText(page, 'download-txt');
}

const scenarios = {
  async captions() {
    browser = await launch({ wav: args.wav, allowMicrophone: true });
    const page = await openPage(browser.context, `${args.base}/`);
    await watch(page, (s) => s.model.startsWith('Model'), scaled(10000), 'the /health model info');
    await page.check('#source-mic');
    const t0 = Date.now();
    await page.click('#start');
    await watch(page, (s) => s.stateKey === 'open', scaled(15000), 'the Live state');
    out.timings.live_ms = Date.now() - t0;
    const expect = args.expect ?? [];
    await watch(page, (s) => hasWords(s.transcript, expect), scaled(args.wait_ms ?? 45000), `finals with ${expect.join(', ')}`);
    out.timings.words_ms = Date.now() - t0;
    await page.click('#stop');
    await watch(page, (s) => s.stateKey === 'closed', scaled(15000), 'the Stopped state after Stop');
    out.timings.stopped_ms = Date.now() - t0;
    await downloads(page);
  },

  async file() {
    browser = await launch({});
    const page = await openPage(browser.context, `${args.base}/`);
    await watch(page, (s) => s.model.startsWith('Model'), scaled(10000), 'the /health model info');
    await page.check('#source-file');
    await page.setInputFiles('#file-input', args.wav);
    const t0 = Date.now();
    await page.click('#start');
    // The file is sent at real-time pace; the page stops by itself at its end.
    await watch(page, (s) => s.stateKey === 'closed' && s.transcript.length > 0, scaled(args.wait_ms ?? 45000), 'the file to finish');
    out.timings.finished_ms = Date.now() - t0;
    await downloads(page);
  },

  async reconnect() {
    // Playwright's WebSocket routing sits between the page and the real server, so the test can cut
    // the connection (close 1012, "service restart") while a sentence is being spoken.
    browser = await launch({ wav: args.wav, allowMicrophone: true });
    const routes = [];
    const page = await openPage(browser.context, `${args.base}/`, (p) =>
      p.routeWebSocket(/\/v1\/listen/, (route) => {
        route.connectToServer();
        routes.push(route);
      }),
    );
    await watch(page, (s) => s.model.startsWith('Model'), scaled(10000), 'the /health model info');
    await page.check('#source-mic');
    await page.click('#start');
    const first = await watch(page, (s) => s.transcript.length >= 1, scaled(30000), 'a first final');
    out.before = first.transcript;
    const cut = args.cut_when ?? [];
    await watch(page, (s) => s.interim && cut.some((w) => s.interim.toLowerCase().includes(w)), scaled(30000), `an interim with ${cut.join('/')}`);
    out.cut_interim = out.interims.at(-1);
    routes[0].close({ code: 1012, reason: 'test: server restart' });
    await watch(page, (s) => routes.length >= 2 && s.stateKey === 'open', scaled(15000), 'the reconnect');
    const expect = args.expect ?? [];
    await watch(page, (s) => hasWords(s.transcript.slice(out.before.length), expect), scaled(30000), `finals with ${expect.join(', ')}`);
    out.connections = routes.length;
    await page.click('#stop');
    await watch(page, (s) => s.stateKey === 'closed', scaled(15000), 'the Stopped state after Stop');
    await downloads(page);
  },

  async 'server-down'() {
    browser = await launch({ wav: args.wav, allowMicrophone: true });
    const page = await openPage(browser.context, `${args.base}/?server=${encodeURIComponent(args.down)}`);
    await watch(page, (s) => s.model.startsWith('Server unreachable'), scaled(10000), 'the unreachable-server notice');
    await page.click('#start');
    await watch(page, (s) => s.message.includes('Could not connect'), scaled(15000), 'a connection error message');
    await page.click('#stop');
    await watch(page, (s) => ['closed', 'failed'].includes(s.stateKey), scaled(10000), 'the stop');
  },

  async 'server-error'() {
    browser = await launch({ wav: args.wav, allowMicrophone: true });
    const page = await openPage(browser.context, `${args.base}/`);
    await page.click('#start');
    await watch(page, (s) => s.stateKey === 'failed' && s.message, scaled(20000), 'the failed state with a message');
  },

  async auth() {
    browser = await launch({ wav: args.wav, allowMicrophone: true });
    // Without a token source the page says what it needs.
    const bare = await openPage(browser.context, `${args.base}/`);
    out.bare_message = (await watch(bare, (s) => s.message.includes('requires a token'), scaled(10000), 'the token-required message')).message;
    await bare.close();
    // With one: the token endpoint is answered here, where the key is, never in the page.
    out.grants = 0;
    const page = await openPage(browser.context, `${args.base}/?token_url=/operator/captions-token`, (p) =>
      p.route((url) => url.pathname === '/operator/captions-token', async (route) => {
        const response = await fetch(`${args.base}/v1/auth/grant`, { method: 'POST', headers: { Authorization: `Token ${args.key}` } });
        out.grants += 1;
        await route.fulfill({ status: response.status, contentType: 'application/json', body: await response.text() });
      }),
    );
    await watch(page, (s) => s.model.startsWith('Model'), scaled(10000), 'the /health model info');
    await page.check('#source-mic');
    await page.click('#start');
    await watch(page, (s) => s.stateKey === 'open', scaled(15000), 'the Live state');
    out.protocol = await page.evaluate(() => window.captionsApp.transcriber?._conn?.ws?.protocol ?? null);
    out.key_in_page = await page.evaluate((key) => document.documentElement.outerHTML.includes(key) || location.href.includes(key), args.key);
    await watch(page, (s) => s.transcript.length >= 1, scaled(30000), 'a first final');
    await page.click('#stop');
    await watch(page, (s) => s.stateKey === 'closed', scaled(15000), 'the Stopped state after Stop');
  },

  async 'mic-denied'() {
    browser = await launch({ wav: args.wav, allowMicrophone: false });
    const page = await openPage(browser.context, `${args.base}/`);
    await page.check('#source-mic');
    await page.click('#start');
    await watch(page, (s) => s.stateKey === 'failed' && s.message, scaled(15000), 'the microphone error');
  },
};

try {
  const run = scenarios[args.scenario];
  if (!run) throw new Error(`unknown scenario ${args.scenario}; known: ${Object.keys(scenarios).join(', ')}`);
  await run();
  await browser?.close();
  finish(0);
} catch (error) {
  out.error = String(error?.stack ?? error);
  await browser?.close().catch(() => {});
  finish(1);
}
