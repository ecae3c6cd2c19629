// The admin page in Debian's headless Chromium, driven by playwright-core, for tests/tests/ui.rs.
//
// Environment: UI_BASE (the replica the page is loaded from), UI_OTHER_REPLICA (the id of the
// replica the agent will connect to), UI_TOKEN (an api token), UI_ARTIFACTS (where screenshots
// go). The Rust side does what a browser cannot (start the agent, make a proposal through the
// API, look at the disk): the script prints `STEP <name> [args]` and waits for a line
// `ok [values]` on stdin. It fails on any request that leaves for a host other than
// 127.0.0.1 or localhost, and on any console error.

import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import path from 'node:path';

const base = process.env.UI_BASE;
const otherReplica = process.env.UI_OTHER_REPLICA;
const token = process.env.UI_TOKEN;
const artifacts = process.env.UI_ARTIFACTS;
if (!base || !otherReplica || !token || !artifacts) {
  console.error('usage: UI_BASE=… UI_OTHER_REPLICA=… UI_TOKEN=… UI_ARTIFACTS=… node admin.mjs');
  process.exit(2);
}
mkdirSync(artifacts, { recursive: true });

const lines = createInterface({ input: process.stdin });
const answers = lines[Symbol.asyncIterator]();
async function step(name, ...args) {
  console.log(['STEP', name, ...args].join(' '));
  const { value, done } = await answers.next();
  if (done) throw new Error(`no answer to step ${name}`);
  const [status, ...rest] = value.trim().split(/\s+/);
  if (status !== 'ok') throw new Error(`step ${name}: ${value}`);
  return rest;
}
const say = (...words) => console.error('[ui]', ...words);
function check(condition, message) {
  if (!condition) throw new Error(message);
}

const problems = [];
const isLocal = (href) => {
  const url = new URL(href);
  return url.protocol === 'data:' || url.protocol === 'blob:' || url.hostname === '127.0.0.1' || url.hostname === 'localhost';
};

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
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
page.on('request', (request) => {
  if (!isLocal(request.url())) problems.push(`request to ${request.url()}`);
});
page.setDefaultTimeout(15000);

async function shot(name, fullPage = true) {
  const file = path.join(artifacts, name);
  await page.screenshot({ path: file, fullPage });
  say('screenshot', file);
}

try {
  // Sign in with the keyboard: type the token, press Enter.
  await page.goto(`${base}/ui`);
  await page.getByLabel('API token').focus();
  await page.keyboard.type(token);
  await page.keyboard.press('Enter');
  await page.locator('#live-status', { hasText: 'Live' }).waitFor();
  const kept = await page.evaluate(() => ({
    session: sessionStorage.getItem('pulsn.apiToken'),
    local: localStorage.length,
    cookies: document.cookie,
  }));
  check(kept.session === token && kept.local === 0 && kept.cookies === '', `token kept as ${JSON.stringify(kept)}`);
  say('signed in');

  // Pair: the exact command, with this page's origin; the copy button answers.
  await page.getByRole('button', { name: 'Mint a pairing code' }).click();
  await page.locator('#pair-command', { hasText: 'host-agent run' }).waitFor();
  const command = (await page.locator('#pair-command').textContent()).trim();
  const parts = /^host-agent run --server (\S+) --code (\S+)$/.exec(command);
  check(parts, `pairing command: ${command}`);
  check(parts[1] === new URL(base).origin, `the command names ${parts[1]}, not ${new URL(base).origin}`);
  await page.getByRole('button', { name: 'Copy' }).click();
  await page.locator('#pair-copy-status').filter({ hasText: /Copied|Selected/ }).waitFor();
  say('paired:', command);

  // The agent connects to the other replica: the device appears online there, live.
  await step('agent', parts[2]);
  const card = page.locator('li.device', { hasText: 'ui-laptop' });
  await card.locator('.badge', { hasText: 'Online' }).waitFor({ timeout: 20000 });
  await card.locator('dd', { hasText: otherReplica }).waitFor();
  await card.locator('dd', { hasText: /^1[0-9]$/ }).waitFor();
  say('the device is online on', otherReplica);

  // read_file through the form built from its schema.
  await card.getByRole('button', { name: 'Run a tool on ui-laptop' }).click();
  await page.getByLabel('Tool', { exact: true }).selectOption('read_file');
  await page.getByLabel('path (required)').fill('hello.txt');
  await page.getByLabel('startLine').waitFor();
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  const content = page.locator('#tool-result pre.file-content');
  await content.waitFor();
  check((await content.textContent()) === 'hello\nworld\n', `read_file showed ${await content.textContent()}`);
  await page.locator('#tool-result', { hasText: '2 lines in the file' }).waitFor();
  // A path outside the roots: refused, in words.
  await page.getByLabel('path (required)').fill('../../../../etc/passwd');
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  await page.locator('#tool-result .notice.bad', { hasText: 'outside the folders this device allows' }).waitFor();
  // list_directory as a table.
  await page.getByLabel('Tool', { exact: true }).selectOption('list_directory');
  await page.getByLabel('path (required)').fill('.');
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  await page.locator('#tool-result table td', { hasText: 'hello.txt' }).first().waitFor();
  // edit_file: an array of objects, with its required fields.
  await page.getByLabel('Tool', { exact: true }).selectOption('edit_file');
  await page.locator('fieldset', { hasText: 'edits (required)' }).getByLabel('find (required)').waitFor();
  await page.getByRole('button', { name: 'Add edits item' }).click();
  check((await page.getByLabel('replace (required)').count()) === 2, 'a second edit item was added');
  say('tools ran through the form');

  // A write made through the API shows up live as a proposal with its diff.
  const [proposalId] = await step('propose');
  const proposal = page.locator(`li.proposal[data-id="${proposalId}"]`);
  await proposal.waitFor();
  await proposal.locator('.diff .add', { hasText: '+written from the page test' }).waitFor();
  await shot('admin-1280.png');

  // Readable at 400 px: nothing wider than the viewport.
  await page.setViewportSize({ width: 400, height: 900 });
  const widest = await page.evaluate(() => document.documentElement.scrollWidth);
  check(widest <= 400, `at 400 px the page is ${widest} px wide`);
  await shot('admin-400.png');
  await page.setViewportSize({ width: 1280, height: 900 });

  // Approve: the outcome is shown, the file is on disk.
  await proposal.getByRole('button', { name: 'Approve' }).click();
  await proposal.locator('.outcome', { hasText: 'Applied' }).waitFor();
  await step('applied');
  say('approved and applied');

  // Every control has a label.
  const unlabelled = await page.evaluate(() =>
    [...document.querySelectorAll('input, select, textarea')]
      .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
      .map((e) => e.id || e.name || e.outerHTML.slice(0, 60)),
  );
  check(unlabelled.length === 0, `controls without a label: ${unlabelled.join(', ')}`);

  // Revoke behind the dialog: Cancel changes nothing, Revoke revokes.
  await card.getByRole('button', { name: 'Revoke ui-laptop' }).click();
  const dialog = page.locator('#revoke-dialog');
  await dialog.waitFor({ state: 'visible' });
  await dialog.getByRole('button', { name: 'Cancel' }).click();
  await dialog.waitFor({ state: 'hidden' });
  check((await card.locator('.badge').textContent()) === 'Online', 'cancel left the device as it was');
  await card.getByRole('button', { name: 'Revoke ui-laptop' }).click();
  await dialog.getByRole('button', { name: 'Revoke', exact: true }).click();
  await card.locator('.badge', { hasText: 'Revoked' }).waitFor();
  await step('revoked');
  await shot('admin-revoked-1280.png');
  say('revoked');

  // Sign out forgets the token.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByLabel('API token').waitFor();
  check((await page.evaluate(() => sessionStorage.getItem('pulsn.apiToken'))) === null, 'sign-out left the token');
} catch (error) {
  problems.push(`step failed: ${error.stack ?? error}`);
  await shot('admin-failure.png').catch(() => {});
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
