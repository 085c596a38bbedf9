// Screenshot of the live-captions page mid-session, for the docs (docs/captions.png). Not run by the
// test suite. With a server running and some speech:
//
//   stream-server --model tiny.en --port 8765 &
//   python -c "from stream_server.testing.speech import speech_with_pauses as s; print(s([
//     'Good morning everyone.', 'Please remember to bring your notebooks to the meeting on Friday afternoon.',
//     'The weather today is sunny with a light breeze.'], pause_s=0.8))"      # prints WAV
//   node client_js/test/e2e/screenshot.mjs http://127.0.0.1:8765 docs/captions.png WAV [light|dark|contrast] [finals]
//
// It starts the microphone (Chromium's fake one, playing WAV), waits until `finals` captions (default 2)
// are final and the next one shows as interim, and takes the picture.

import { launch, scaled, until } from './browser.mjs';

const [base, out, wav, theme = 'light', finalsWanted = '2'] = process.argv.slice(2);
if (!base || !out || !wav) {
  console.error('usage: node screenshot.mjs BASE_URL OUT.png SPEECH.wav [light|dark|contrast] [finals]');
  process.exit(2);
}

const browser = await launch({
  wav,
  allowMicrophone: true,
  viewport: { width: 1280, height: 800 },
  colorScheme: theme === 'light' ? 'light' : 'dark',
});
try {
  const page = await browser.context.newPage();
  await page.goto(`${base}/${theme === 'contrast' ? '?contrast=1' : ''}`);
  await until(() => page.evaluate(() => document.getElementById('model').textContent.startsWith('Model')), scaled(10000), 'health');
  await page.check('#source-mic');
  await page.click('#start');
  await until(
    () =>
      page.evaluate(
        (n) => document.querySelectorAll('#transcript li').length >= n && Boolean(document.querySelector('#captions .interim')?.textContent),
        Number(finalsWanted),
      ),
    scaled(60000),
    `${finalsWanted} finals and an interim`,
    50,
  );
  await page.screenshot({ path: out });
  console.log(`wrote ${out}`);
  await page.click('#stop');
} finally {
  await browser.close();
}
