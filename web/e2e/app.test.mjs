// End-to-end test of the browser app in headless Chromium, against three real Griddle nodes.
//
// The story of issue 6, step by step, with the browser doing what a person would do:
// alice and bob sign in on two different nodes (two browser contexts); bob types and alice
// sees it; bob sends, alice's badge rises and the message appears; alice opens the
// conversation and the badge clears in a second tab of hers; alice flirts and it shows in
// bob's feed; then alice's node is killed (SIGKILL) and her tab carries on through another
// node without losing a message. Along the way: carol signs in with a token handed to the
// page (the production path), pages back through a long history by scrolling, and axe-core
// checks the main views for accessibility problems. Screenshots go to docs/screenshots.
//
// Run by scripts/test (`node web/e2e/app.test.mjs`). Environment:
//   GRIDDLE_BIN      the griddle binary (default: $CARGO_TARGET_DIR/release/griddle)
//   CHROMIUM         the browser (default /usr/bin/chromium)
//   SCREENSHOT_DIR   where screenshots go (default docs/screenshots in the repo)
//   E2E_KEEP=1       keep the nodes' data and logs (printed) after the run

import { spawn } from 'node:child_process';
import assert from 'node:assert/strict';
import dgram from 'node:dgram';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const targetDir = process.env.CARGO_TARGET_DIR || path.join(os.homedir(), '.cache/griddle/target');
const griddleBin = process.env.GRIDDLE_BIN || path.join(targetDir, 'release/griddle');
const chromiumBin = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = process.env.SCREENSHOT_DIR || path.join(repo, 'docs/screenshots');
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'griddle-e2e-'));

// Limits for what a person would notice. Generous on a loaded 2-core machine, still far
// below "it broke": the app's own backoff and the cluster's failover (about 2 s) fit in them.
const LIVE_MS = 3000;       // something pushed shows up
const TYPING_MS = 1000;     // "is typing…" shows up within a second (the bar)
const FAILOVER_MS = 20000;  // the tab has moved and caught up after its node died

const started = Date.now();
const log = (...args) => console.log(`[e2e ${((Date.now() - started) / 1000).toFixed(1)}s]`, ...args);

// ------------------------------------------------------------------ the cluster

function freeTcpPort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function freeUdpPort() {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket('udp4');
    socket.once('error', reject);
    socket.bind(0, '127.0.0.1', () => {
      const { port } = socket.address();
      socket.close(() => resolve(port));
    });
  });
}

class Node {
  constructor(name, http, mesh, join) {
    Object.assign(this, { name, http, mesh, join, child: null });
    this.url = `http://127.0.0.1:${http}`;
    this.dir = path.join(work, name);
  }

  start() {
    const args = ['serve', '--dev', '--replicas', '3', '--node-id', this.name,
      '--http', `127.0.0.1:${this.http}`, '--mesh', `127.0.0.1:${this.mesh}`,
      '--join', this.join, '--data-dir', this.dir];
    const out = fs.openSync(path.join(work, `${this.name}.log`), 'a');
    this.child = spawn(griddleBin, args, { stdio: ['ignore', out, out] });
    this.child.on('exit', (code, signal) => { this.exited = { code, signal }; });
  }

  kill() {
    this.child.kill('SIGKILL');
  }

  async ready(timeoutMs = 30000) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.exited) throw new Error(`${this.name} exited: ${JSON.stringify(this.exited)}; see ${work}`);
      try {
        if ((await fetch(`${this.url}/readyz`)).ok) return;
      } catch { /* not listening yet */ }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    throw new Error(`${this.name} not ready after ${timeoutMs} ms; see ${work}`);
  }
}

async function startCluster(count) {
  const ports = [];
  for (let i = 0; i < count; i++) ports.push([await freeTcpPort(), await freeUdpPort()]);
  const seed = `127.0.0.1:${ports[0][1]}`;
  const nodes = ports.map(([http, mesh], i) =>
    new Node(`e2e-${i + 1}`, http, mesh, i === 0 ? `127.0.0.1:${ports[1][1]}` : seed));
  nodes.forEach((node) => node.start());
  await Promise.all(nodes.map((node) => node.ready()));
  return nodes;
}

// ------------------------------------------------------------------ browser helpers

const byTestId = (page, id) => page.locator(`[data-testid="${id}"]`);

async function signIn(page, url, user) {
  await page.goto(url);
  await byTestId(page, 'login-user').fill(user);
  await byTestId(page, 'login-submit').click();
  await page.locator('#app').waitFor({ state: 'visible' });
  await page.locator('#conn[data-state="live"]').waitFor({ timeout: 10000 });
}

async function openChat(page, peer) {
  await byTestId(page, 'new-chat-peer').fill(peer);
  await byTestId(page, 'new-chat-open').click();
  await page.locator('#convo').waitFor({ state: 'visible' });
}

/**
 * Waits until `read()` (run in the page) returns something truthy; returns it and the time it
 * took. Marked handled at once, so a wait started ahead of other steps cannot crash the run
 * (and leave processes behind) if it fails before it is awaited.
 */
function until(page, read, arg, timeoutMs, what) {
  const waiting = untilInner(page, read, arg, timeoutMs, what);
  waiting.catch(() => {});
  return waiting;
}

async function untilInner(page, read, arg, timeoutMs, what) {
  const begin = Date.now();
  try {
    const handle = await page.waitForFunction(read, arg, { timeout: timeoutMs, polling: 20 });
    return { value: await handle.jsonValue(), ms: Date.now() - begin };
  } catch (err) {
    throw new Error(`${what}: not within ${timeoutMs} ms (${err.message.split('\n')[0]})`);
  }
}

const unreadTotal = (page) => byTestId(page, 'unread-total').textContent().then(Number);

/** Messages shown in the open conversation: [{version, text}] in page order. */
const shownMessages = (page) => page.$$eval('[data-testid="message"]', (nodes) => nodes.map((node) => ({
  version: Number(node.dataset.version || 0),
  text: node.querySelector('.bubble').textContent,
})));

/** A user's token from the dev login, as a site's backend would hand one to the page. */
async function devToken(node, user) {
  const answer = await fetch(`${node.url}/v1/dev/token`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ user }),
  });
  assert.equal(answer.status, 200, 'dev token');
  return (await answer.json()).token;
}

/** axe-core's serious and critical findings on the page as it is now (WCAG 2 A/AA rules). */
async function accessibilityProblems(page) {
  await page.addScriptTag({ path: path.join(path.dirname(fileURLToPath(import.meta.url)), 'node_modules/axe-core/axe.min.js') });
  const found = await page.evaluate(async () => {
    const result = await window.axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] });
    return result.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target.join(' ')) }));
  });
  return found.filter((v) => v.impact === 'serious' || v.impact === 'critical');
}

async function shot(page, name) {
  fs.mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: path.join(shots, `${name}.png`) });
}

// ------------------------------------------------------------------ the story

async function story(nodes, browser) {
  const [nodeA, nodeB, nodeC] = nodes;
  const desktop = { viewport: { width: 1280, height: 800 } };
  const aliceCtx = await browser.newContext(desktop);
  const bobCtx = await browser.newContext(desktop);
  const alice = await aliceCtx.newPage();
  const bob = await bobCtx.newPage();
  const pageErrors = [];
  for (const ctx of [aliceCtx, bobCtx]) {
    ctx.on('page', (page) => page.on('pageerror', (err) => pageErrors.push(err.message)));
  }
  for (const page of [alice, bob]) page.on('pageerror', (err) => pageErrors.push(err.message));

  await alice.goto(nodeA.url);
  await byTestId(alice, 'login-user').waitFor();
  assert.deepEqual(await accessibilityProblems(alice), [], 'sign-in screen: no serious accessibility problems');
  await shot(alice, 'login');
  await signIn(alice, nodeA.url, 'alice');
  await signIn(bob, nodeB.url, 'bob');
  log(`alice on ${nodeA.name}, bob on ${nodeB.name}`);

  // bob starts a chat and types: alice's list shows him typing, within a second.
  await openChat(bob, 'alice');
  const typingSeen = until(alice, () => {
    const row = document.querySelector('[data-testid="chat-item"][data-peer="bob"]');
    return row && /typing/.test(row.textContent);
  }, undefined, TYPING_MS + 2000, 'alice sees bob typing in her chat list');
  await byTestId(bob, 'message-input').pressSequentially('Hi alice', { delay: 30 });
  log(`alice saw "typing" ${(await typingSeen).ms} ms after bob started typing`);

  // bob sends: alice's badge rises, the chat list shows the message, a notification pops up.
  const toastShown = alice.locator('.toast', { hasText: 'Hi alice' }).waitFor({ timeout: LIVE_MS + 2000 });
  toastShown.catch(() => {});
  await byTestId(bob, 'message-send').click();
  const badge = await until(alice, () => Number(document.querySelector('[data-testid="unread-total"]').textContent) === 1,
    undefined, LIVE_MS, 'alice\'s unread badge rises to 1');
  log(`alice's badge rose ${badge.ms} ms after bob sent`);
  await until(alice, () => {
    const row = document.querySelector('[data-testid="chat-item"][data-peer="bob"]');
    return row && row.textContent.includes('Hi alice') && !/typing/.test(row.textContent);
  }, undefined, LIVE_MS, 'alice\'s chat list shows bob\'s message, no longer typing');
  await toastShown; // the notification (it lives 5 s)
  await shot(alice, 'chats-unread');

  // A second tab of alice's (same browser, so already signed in) shows the same count.
  const alice2 = await aliceCtx.newPage();
  await alice2.goto(nodeA.url);
  await alice2.locator('#app').waitFor({ state: 'visible' });
  assert.equal(await alice2.locator('#me-name').textContent(), 'alice', 'the second tab is alice\'s');
  await until(alice2, () => document.querySelector('[data-testid="unread-total"]').textContent === '1',
    undefined, LIVE_MS, 'alice\'s second tab shows 1 unread');

  // alice opens the conversation: the message is there, and the badge clears in both tabs.
  await alice.bringToFront();
  await alice.locator('[data-testid="chat-item"][data-peer="bob"]').click();
  await alice.locator('[data-testid="message"][data-version]', { hasText: 'Hi alice' }).waitFor({ timeout: LIVE_MS });
  await until(alice, () => document.querySelector('[data-testid="unread-total"]').textContent === '0',
    undefined, LIVE_MS, 'alice\'s badge clears in the tab that read');
  const cleared = await until(alice2, () => document.querySelector('[data-testid="unread-total"]').textContent === '0',
    undefined, LIVE_MS, 'alice\'s badge clears in her second tab');
  log(`badge cleared in alice's second tab ${cleared.ms} ms after she opened the conversation`);

  // In the open conversation, "bob is typing…" shows within a second and goes once he stops.
  const typingOn = until(alice, () => {
    const node = document.querySelector('[data-testid="typing"]');
    return node && !node.hidden && node.textContent.includes('bob is typing');
  }, undefined, TYPING_MS + 2000, 'alice sees "bob is typing…" in the conversation');
  await byTestId(bob, 'message-input').pressSequentially('How are', { delay: 30 });
  const stoppedAt = Date.now();
  log(`"bob is typing…" shown ${(await typingOn).ms} ms after he started`);
  await shot(alice, 'conversation-typing');
  await until(alice, () => document.querySelector('[data-testid="typing"]').hidden,
    undefined, 10000, '"is typing…" goes away after bob stops');
  const gone = Date.now() - stoppedAt;
  log(`"is typing…" gone ${gone} ms after bob stopped`);
  assert.ok(gone >= 1000, 'the typing signal lasts a moment after the last key');
  await byTestId(bob, 'message-input').fill('');

  // alice answers; bob gets it live in his open conversation.
  await byTestId(alice, 'message-input').fill('Hi bob! Nice to meet you.');
  await byTestId(alice, 'message-input').press('Enter');
  await bob.locator('[data-testid="message"][data-version]', { hasText: 'Nice to meet you' })
    .waitFor({ timeout: LIVE_MS });

  // alice flirts: it goes straight into bob's feed.
  await byTestId(alice, 'flirt-button').click();
  await bob.locator('[data-testid="feed-item"]', { hasText: 'alice flirted with you' }).waitFor({ timeout: LIVE_MS });
  // The online list refreshes every 15 s; alice's presence lives on her node, asked by bob's.
  await until(bob, () => {
    const users = [...document.querySelectorAll('[data-testid="online-user"]')].map((node) => node.dataset.user);
    return users.includes('alice') && users.includes('bob');
  }, undefined, 20000, 'bob sees alice and himself online');
  await until(bob, () => document.querySelectorAll('[data-testid="cluster-member"][data-state="alive"]').length === 3,
    undefined, 15000, 'bob\'s cluster view lists three live members');
  await shot(bob, 'feed-and-online');
  assert.deepEqual(await accessibilityProblems(bob), [], 'app with a conversation open: no serious accessibility problems');

  // A phone-sized screen: one pane at a time.
  const phone = await bobCtx.newPage();
  await phone.setViewportSize({ width: 390, height: 844 });
  await phone.goto(nodeB.url);
  await phone.locator('#app').waitFor({ state: 'visible' });
  await phone.locator('[data-testid="chat-item"][data-peer="alice"]').click();
  await phone.locator('[data-testid="message"][data-version]', { hasText: 'Nice to meet you' }).waitFor({ timeout: LIVE_MS });
  await shot(phone, 'phone-conversation');
  await phone.close();

  await historyByToken(nodes, browser);

  // alice's node dies. Her tab carries on through another node without losing a message.
  await alice2.close();
  const before = await shownMessages(alice);
  const talksTo = await alice.locator('#cluster-node').textContent();
  assert.match(talksTo, new RegExp(nodeA.name), `alice's tab talks to ${nodeA.name} before the kill`);
  nodeA.kill();
  const killedAt = Date.now();
  log(`killed ${nodeA.name}; bob keeps writing`);
  const sent = [];
  for (let i = 1; i <= 5; i++) {
    const text = `After the crash, message ${i}`;
    await byTestId(bob, 'message-input').fill(text);
    await byTestId(bob, 'message-send').click();
    sent.push(text);
  }
  const arrived = await until(alice, (texts) => {
    const shown = [...document.querySelectorAll('[data-testid="message"][data-version]')].map((node) => node.textContent);
    return texts.every((text) => shown.some((line) => line.includes(text)));
  }, sent, FAILOVER_MS, 'alice\'s tab shows all five messages bob sent after her node died');
  log(`all of bob's messages reached alice's tab ${Date.now() - killedAt} ms after the kill (waited ${arrived.ms} ms)`);
  await until(alice, (dead) => !document.querySelector('#cluster-node').textContent.includes(dead),
    nodeA.name, FAILOVER_MS, 'alice\'s cluster view names her new node');
  log(`alice's tab now: ${await alice.locator('#cluster-node').textContent()}`);

  // She can still write, and bob gets it.
  await byTestId(alice, 'message-input').fill('Still here after my node died');
  await byTestId(alice, 'message-send').click();
  await bob.locator('[data-testid="message"][data-version]', { hasText: 'Still here after my node died' })
    .waitFor({ timeout: FAILOVER_MS });
  await alice.locator('[data-testid="message"][data-version]', { hasText: 'Still here after my node died' })
    .waitFor({ timeout: FAILOVER_MS });
  await shot(alice, 'after-failover');

  // Nothing lost, nothing twice: versions 1..n, each once, in order, with every text.
  const after = await shownMessages(alice);
  const versions = after.map((message) => message.version);
  assert.deepEqual(versions, versions.map((_, i) => i + 1), `alice's conversation is dense and ordered: ${versions}`);
  for (const message of before) {
    assert.ok(after.some((m) => m.version === message.version && m.text === message.text), `kept: ${message.text}`);
  }
  const expected = ['Hi alice', 'Hi bob! Nice to meet you.', ...sent, 'Still here after my node died'];
  assert.deepEqual(after.map((message) => message.text), expected, 'alice sees exactly the conversation');
  // And a fresh load from the surviving nodes agrees with what the tab built up live.
  const reloaded = await bobCtx.newPage();
  await signIn(reloaded, nodeC.url, 'bob'); // another origin: its own storage, so sign in again
  await reloaded.locator('[data-testid="chat-item"][data-peer="alice"]').click();
  await until(reloaded, (n) => document.querySelectorAll('[data-testid="message"][data-version]').length === n,
    expected.length, LIVE_MS, 'a fresh tab on another node loads the same history');
  assert.deepEqual((await shownMessages(reloaded)).map((message) => message.text), expected);
  log(`conversation intact: ${after.length} messages, versions 1..${after.length}`);
  assert.deepEqual(pageErrors, [], 'no script errors in any tab');
}

/**
 * carol signs in with a token handed to the page in `#token=` (how a site signs its members
 * in), opens a conversation with a long history, sees the newest page, and scrolls up
 * through the older ones: every message once, in order.
 */
async function historyByToken(nodes, browser) {
  const dave = await devToken(nodes[0], 'dave');
  const total = 130; // more than two pages of 50
  for (let i = 1; i <= total; i++) {
    const answer = await fetch(`${nodes[i % 3].url}/v1/chats/carol/messages`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${dave}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ id: `01JE2E0000000000000000${String(i).padStart(4, '0')}`, text: `History line ${i}` }),
    });
    assert.equal(answer.status, 201, `dave's message ${i}`);
  }
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const carol = await ctx.newPage();
  await carol.goto(`${nodes[2].url}/#token=${await devToken(nodes[2], 'carol')}`);
  await carol.locator('#app').waitFor({ state: 'visible' });
  assert.equal(await carol.locator('#me-name').textContent(), 'carol', 'the handed token signs carol in');
  assert.equal(new URL(carol.url()).hash, '', 'the token is taken out of the address bar');
  await until(carol, () => document.querySelector('[data-testid="unread-total"]').textContent === '130',
    undefined, LIVE_MS, 'carol has 130 unread');
  await carol.locator('[data-testid="chat-item"][data-peer="dave"]').click();
  await until(carol, () => document.querySelectorAll('[data-testid="message"][data-version]').length === 50,
    undefined, LIVE_MS, 'the newest page (50 messages) loads first');
  assert.deepEqual((await shownMessages(carol)).map((m) => m.version)[0], total - 49, 'the newest 50');
  // Scrolling to the top loads the older pages, keeping the reader's place.
  for (let pages = 0; pages < 10; pages++) {
    const shown = await carol.locator('[data-testid="message"][data-version]').count();
    if (shown === total) break;
    await carol.locator('#messages-scroll').evaluate((node) => { node.scrollTop = 0; });
    await until(carol, (n) => document.querySelectorAll('[data-testid="message"][data-version]').length > n,
      shown, LIVE_MS, 'scrolling up loads an older page');
  }
  const all = await shownMessages(carol);
  assert.deepEqual(all.map((m) => m.version), Array.from({ length: total }, (_, i) => i + 1), 'every message once, in order');
  assert.deepEqual(all.map((m) => m.text), Array.from({ length: total }, (_, i) => `History line ${i + 1}`));
  assert.equal(await carol.locator('#older').isHidden(), true, 'no "load older" once the start is reached');
  await until(carol, () => document.querySelector('[data-testid="unread-total"]').textContent === '0',
    undefined, LIVE_MS, 'reading clears carol\'s badge');
  log(`carol (token sign-in) paged through ${total} messages`);
  await ctx.close();
}

async function main() {
  for (const [what, file] of [['griddle binary', griddleBin], ['chromium', chromiumBin]]) {
    if (!fs.existsSync(file)) throw new Error(`${what} not found at ${file}`);
  }
  const nodes = await startCluster(3);
  log(`three nodes up in ${work}`);
  const browser = await chromium.launch({
    executablePath: chromiumBin,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  let failed = false;
  try {
    await story(nodes, browser);
  } catch (err) {
    failed = true;
    console.error(err);
  } finally {
    await browser.close().catch(() => {});
    for (const node of nodes) if (!node.exited) node.child.kill('SIGKILL');
  }
  if (failed || process.env.E2E_KEEP) console.error(`node data and logs kept in ${work}`);
  else fs.rmSync(work, { recursive: true, force: true });
  if (failed) process.exit(1);
  log(`passed; screenshots in ${path.relative(repo, shots)}`);
}

await main();
