// Enrollment by link in Debian's headless Chromium, driven by playwright-core, for
// tests/tests/grant.rs: open the link a host agent printed (`/ui/activate?code=…`), sign in
// with the keyboard, see the device's name, platform and roots, approve it.
//
// Environment: UI_LINK (the link), UI_TOKEN (an api token), UI_NAME (the device's name),
// UI_ROOT (a root it serves), UI_ARTIFACTS (where screenshots go). After approving, it prints
// `STEP connected` and waits for `ok` on stdin (the Rust side sees the agent online). It fails
// on any request that leaves for another host than 127.0.0.1 or localhost, and on any console
// error.

import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import path from 'node:path';

const { UI_LINK: link, UI_TOKEN: token, UI_NAME: name, UI_ROOT: root, UI_ARTIFACTS: artifacts } = process.env;
if (!link || !token || !name || !root || !artifacts) {
  console.error('usage: UI_LINK=… UI_TOKEN=… UI_NAME=… UI_ROOT=… UI_ARTIFACTS=… node activate.mjs');
  process.exit(2);
}
mkdirSync(artifacts, { recursive: true });
const lines = createInterface({ input: process.stdin });
const answers = lines[Symbol.asyncIterator]();
async function step(stepName) {
  console.log(`STEP ${stepName}`);
  const { value, done } = await answers.next();
  if (done || value.trim() !== 'ok') throw new Error(`step ${stepName}: ${value}`);
}
const say = (...words) => console.error('[activate]', ...words);
function check(condition, message) {
  if (!condition) throw new Error(message);
}

const problems = [];
const isLocal = (href) => {
  const url = new URL(href);
  return url.protocol === 'data:' || url.hostname === '127.0.0.1' || url.hostname === 'localhost';
};
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
});
const context = await browser.newContext({ viewport: { width: 400, height: 900 } });
await context.route(
  (url) => !isLocal(url.href),
  (route) => {
    problems.push(`a request left for ${route.request().url()}`);
    return route.abort();
  },
);
const page = await context.newPage();
page.on('console', (message) => {
  if (message.type() === 'error') problems.push(`console error: ${message.text()}`);
});
page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
page.setDefaultTimeout(15000);

try {
  await page.goto(link);
  await page.getByLabel('API token').focus();
  await page.keyboard.type(token);
  await page.keyboard.press('Enter');
  const code = new URL(link).searchParams.get('code');
  check((await page.getByLabel('Code shown by the device').inputValue()) === code, 'the code from the link is filled in');
  const panel = page.locator('#activate');
  await panel.locator('#activate-name', { hasText: name }).waitFor();
  const facts = await panel.locator('#activate-facts').innerText();
  check(facts.includes(code), `the code is shown: ${facts}`);
  check(/linux|macos|windows/.test(facts), `the platform is shown: ${facts}`);
  check(facts.includes(root), `the root ${root} is shown: ${facts}`);
  await panel.locator('#activate-outcome', { hasText: 'Waiting for your decision' }).waitFor();
  await page.screenshot({ path: path.join(artifacts, 'activate-400.png'), fullPage: true });
  say('the device is shown:', facts.replace(/\s+/g, ' '));

  await panel.getByRole('button', { name: 'Approve' }).click();
  await panel.locator('#activate-outcome', { hasText: 'Approved' }).waitFor();
  check(await panel.locator('#activate-actions').isHidden(), 'no second decision offered');
  await step('connected');
  // The device arrives live in the list, through the events stream.
  await page.locator('li.device', { hasText: name }).locator('.badge', { hasText: 'Online' }).waitFor({ timeout: 20000 });
  await page.screenshot({ path: path.join(artifacts, 'activate-approved-400.png'), fullPage: true });
  say('approved and online');
} catch (error) {
  problems.push(`step failed: ${error.stack ?? error}`);
  await page.screenshot({ path: path.join(artifacts, 'activate-failure.png'), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}

if (problems.length > 0) {
  console.error(problems.join('\n'));
  console.log('FAILED');
  process.exit(1);
}
console.log('DONE');
lines.close();
process.exit(0);
