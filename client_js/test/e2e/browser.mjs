// Headless Chromium for the end-to-end tests and the screenshot script: Debian's /usr/bin/chromium
// driven by playwright-core (no downloaded browser), with a fake microphone that plays a WAV file.
//
// Every wait is bounded; STREAM_SERVER_TEST_TIMEOUT_SCALE multiplies them all (as tests/conftest.py).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.STREAM_SERVER_CHROMIUM ?? '/usr/bin/chromium';
export const SCALE = Number(process.env.STREAM_SERVER_TEST_TIMEOUT_SCALE ?? '1') || 1;

/** A timeout in ms, scaled for slow machines. */
export function scaled(ms) {
  return Math.round(ms * SCALE);
}

// This machine refuses outside connections: without these Chromium waits on them (updates, sync,
// QUIC probes, first-run pages).
const QUIET_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--no-default-browser-check',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-extensions',
  '--disable-dev-shm-usage',
  '--autoplay-policy=no-user-gesture-required',
];

/**
 * Launch Chromium with a fresh profile.
 * @param {{wav?: string, allowMicrophone?: boolean, viewport?: {width: number, height: number},
 *          colorScheme?: 'light'|'dark'}} options
 *   wav: 16-bit PCM WAV the fake microphone plays (in a loop); allowMicrophone: auto-accept the
 *   permission prompt (--use-fake-ui-for-media-stream); without it the request is denied.
 * @returns {Promise<{context: import('playwright-core').BrowserContext, close: () => Promise<void>}>}
 */
export async function launch({ wav, allowMicrophone = true, viewport = { width: 1280, height: 800 }, colorScheme = 'light' } = {}) {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'captions-e2e-'));
  const args = [...QUIET_FLAGS, '--use-fake-device-for-media-stream'];
  if (wav) args.push(`--use-file-for-fake-audio-capture=${wav}`);
  if (allowMicrophone) args.push('--use-fake-ui-for-media-stream');
  else args.push('--deny-permission-prompts');
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args,
    acceptDownloads: true,
    viewport,
    colorScheme,
    timeout: scaled(30000),
  });
  context.setDefaultTimeout(scaled(15000));
  return {
    context,
    async close() {
      await Promise.race([context.close().catch(() => {}), new Promise((r) => setTimeout(r, scaled(10000)))]);
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** Poll `fn` every `everyMs` until it returns a truthy value (returned) or `ms` pass (throws). */
export async function until(fn, ms, what, everyMs = 100) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
