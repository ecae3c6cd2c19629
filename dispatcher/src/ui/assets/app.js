// The admin page: sign-in with an api token (this tab's session storage only), the user's
// devices and proposals kept live from /api/events, pairing, a device connecting by link
// (activate.js), a tool form per device, approve, reject and revoke. Plain DOM, no framework;
// server data only ever through textContent.

import { followEvents } from './sse.js';
import { buildForm, FormError } from './form.js';
import { describeError, renderPlan, renderResult } from './result.js';
import { setupActivation } from './activate.js';

const TOKEN_KEY = 'pulsn.apiToken';
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  events: null,
  /** id → Device (with `revoked` once revoked) */
  devices: new Map(),
  /** id → Proposal: pending ones, and the ones decided while the page was open */
  proposals: new Map(),
  /** the device whose tools the panel shows */
  toolDevice: null,
  toolForm: null,
  tools: [],
  /** the panel that approves a device connecting by link */
  activation: null,
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(text, onClick, className) {
  const b = el('button', className, text);
  b.type = 'button';
  b.addEventListener('click', onClick);
  return b;
}

function announce(text) {
  const region = $('announce');
  region.textContent = '';
  // A fresh text node is what screen readers announce.
  setTimeout(() => {
    region.textContent = text;
  }, 50);
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store' });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (response.status === 401) {
    signOut('The server no longer accepts this token. Sign in again.');
  }
  return { status: response.status, body: json };
}

function relativeTime(iso) {
  if (!iso) return 'never';
  const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (!Number.isFinite(seconds)) return iso;
  if (seconds < 5) return 'just now';
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleString();
}

// ---- sign-in ----

function showSignedIn(signedIn) {
  $('sign-in').hidden = signedIn;
  $('signed-in').hidden = !signedIn;
  $('sign-out').hidden = !signedIn;
}

function signIn(token) {
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  showSignedIn(true);
  state.events?.close();
  state.events = followEvents({
    token,
    onFrame,
    onStatus: (status) => {
      const words = { connecting: 'Connecting…', live: 'Live', reconnecting: 'Reconnecting…' };
      $('live-status').textContent = words[status] ?? status;
    },
    onUnauthorized: () => signOut('That token was refused. Check it and sign in again.'),
  });
  state.activation?.start();
}

function signOut(message) {
  state.events?.close();
  state.events = null;
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  state.devices.clear();
  state.proposals.clear();
  $('devices').replaceChildren();
  $('proposals').replaceChildren();
  closeTools();
  $('pair-result').hidden = true;
  state.activation?.reset();
  $('live-status').textContent = 'Signed out';
  showSignedIn(false);
  $('sign-in-error').textContent = message ?? '';
  $('token').value = '';
  $('token').focus();
}

// ---- events ----

function onFrame(frame) {
  if (frame.event === 'comment') return;
  let data;
  try {
    data = JSON.parse(frame.data);
  } catch {
    return;
  }
  if (frame.event === 'snapshot') {
    state.devices = new Map(data.devices.map((d) => [d.id, d]));
    // Keep decisions seen here; pending ones come from the snapshot.
    for (const [id, p] of state.proposals) if (p.status === 'pending') state.proposals.delete(id);
    for (const p of data.proposals) state.proposals.set(p.id, p);
    renderDevices();
    renderProposals();
  } else if (frame.event === 'device') {
    const before = state.devices.get(data.id);
    state.devices.set(data.id, data);
    renderDevices();
    if (data.revoked) announce(`${data.name} was revoked.`);
    else if (!before) announce(`New device: ${data.name}.`);
    else if (before.online !== data.online) announce(`${data.name} is ${data.online ? 'online' : 'offline'}.`);
    if (state.toolDevice === data.id && data.revoked) closeTools();
  } else if (frame.event === 'proposal') {
    const before = state.proposals.get(data.id);
    state.proposals.set(data.id, data);
    renderProposals();
    if (!before && data.status === 'pending') announce(`New proposal: ${data.tool} on ${deviceName(data.deviceId)}.`);
    else if (before && before.status !== data.status) announce(`Proposal ${data.tool}: ${data.status}.`);
    if (data.proposal?.diffOmitted) loadFullProposal(data.id);
  }
}

async function loadFullProposal(id) {
  const { status, body } = await api('GET', `/api/proposals/${encodeURIComponent(id)}`);
  if (status === 200 && body) {
    state.proposals.set(id, body);
    renderProposals();
  }
}

function deviceName(id) {
  return state.devices.get(id)?.name ?? id;
}

// ---- devices ----

function fact(list, term, value) {
  list.append(el('dt', null, term), el('dd', null, value));
}

function renderDevices() {
  const list = $('devices');
  const devices = [...state.devices.values()].sort((a, b) => String(a.createdAt).localeCompare(String(b.createdAt)));
  $('devices-empty').hidden = devices.length > 0;
  const keep = new Set(devices.map((d) => d.id));
  for (const item of [...list.children]) if (!keep.has(item.dataset.id)) item.remove();
  for (const device of devices) {
    let item = list.querySelector(`li[data-id="${CSS.escape(device.id)}"]`);
    if (!item) {
      item = el('li', 'card device');
      item.dataset.id = device.id;
      const head = el('div', 'card-head');
      const title = el('h3', 'device-name');
      title.id = `device-${device.id}`;
      head.append(title, el('span', 'badge'));
      const facts = el('dl', 'facts');
      const actions = el('div', 'actions');
      const tools = button('Run a tool', () => openTools(device.id));
      tools.className = 'open-tools';
      const revoke = button('Revoke…', () => confirmRevoke(device.id), 'danger revoke');
      actions.append(tools, revoke);
      item.append(head, facts, actions);
      item.setAttribute('aria-labelledby', title.id);
      list.append(item);
    }
    item.querySelector('h3').textContent = device.name;
    const badge = item.querySelector('.badge');
    const status = device.revoked ? 'revoked' : device.online ? 'online' : 'offline';
    badge.className = `badge ${status}`;
    badge.textContent = device.revoked ? 'Revoked' : device.online ? 'Online' : 'Offline';
    item.classList.toggle('revoked', Boolean(device.revoked));
    const facts = item.querySelector('dl');
    facts.replaceChildren();
    fact(facts, 'Platform', device.platform ?? 'unknown');
    fact(facts, 'Replica', device.online ? device.replica ?? '—' : '—');
    const seen = el('time', null, device.online ? 'now' : relativeTime(device.lastSeenAt));
    if (device.lastSeenAt) {
      seen.dateTime = device.lastSeenAt;
      seen.title = device.lastSeenAt;
    }
    const seenCell = el('dd');
    seenCell.append(seen);
    facts.append(el('dt', null, 'Last seen'), seenCell);
    fact(facts, 'Roots', device.roots?.length ? device.roots.join(', ') : 'none reported');
    const toolCount = device.toolCount ?? device.tools?.length;
    fact(facts, 'Tools', toolCount === undefined ? 'none reported' : String(toolCount));
    for (const b of item.querySelectorAll('button')) b.disabled = Boolean(device.revoked);
    item.querySelector('.open-tools').setAttribute('aria-label', `Run a tool on ${device.name}`);
    item.querySelector('.revoke').setAttribute('aria-label', `Revoke ${device.name}`);
  }
  if (state.toolDevice && state.devices.has(state.toolDevice)) {
    $('tool-title').textContent = `Run a tool on ${deviceName(state.toolDevice)}`;
  }
}

function confirmRevoke(id) {
  const device = state.devices.get(id);
  if (!device) return;
  const dialog = $('revoke-dialog');
  $('revoke-title').textContent = `Revoke ${device.name}?`;
  $('revoke-text').textContent = `${device.name} will be disconnected at once and its agent will forget its credentials. This cannot be undone: the device would have to be paired again.`;
  dialog.returnValue = '';
  const opener = document.activeElement;
  dialog.addEventListener(
    'close',
    async () => {
      if (dialog.returnValue !== 'revoke') {
        opener?.focus?.();
        return;
      }
      const { status, body } = await api('DELETE', `/api/devices/${encodeURIComponent(id)}`);
      if (status === 204 || status === 404) {
        const current = state.devices.get(id);
        if (current) state.devices.set(id, { ...current, online: false, revoked: true });
        renderDevices();
        announce(`${device.name} was revoked.`);
        $('devices-title').focus?.();
      } else {
        announce(`Could not revoke ${device.name}: ${body?.error ?? status}`);
      }
    },
    { once: true },
  );
  dialog.showModal();
}

// ---- pairing ----

async function pair() {
  $('pair-error').textContent = '';
  $('pair').disabled = true;
  try {
    const { status, body } = await api('POST', '/api/pairing-codes', {});
    if (status !== 201 || !body?.code) {
      $('pair-error').textContent = `No pairing code: ${body?.error ?? `the server answered ${status}`}`;
      return;
    }
    const command = `host-agent run --server ${window.location.origin} --code ${body.code}`;
    $('pair-command').textContent = command;
    const minutes = Math.max(1, Math.round((Date.parse(body.expiresAt) - Date.now()) / 60000));
    $('pair-expiry').textContent = `${minutes} minute${minutes === 1 ? '' : 's'}`;
    $('pair-copy-status').textContent = '';
    $('pair-result').hidden = false;
    announce(`Pairing code ${body.code} minted.`);
    $('pair-copy').focus();
  } finally {
    $('pair').disabled = false;
  }
}

async function copyCommand() {
  const text = $('pair-command').textContent;
  try {
    await navigator.clipboard.writeText(text);
    $('pair-copy-status').textContent = 'Copied.';
  } catch {
    const range = document.createRange();
    range.selectNodeContents($('pair-command'));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $('pair-copy-status').textContent = 'Selected: press Ctrl+C (⌘C) to copy.';
  }
}

// ---- tools ----

function closeTools() {
  state.toolDevice = null;
  state.toolForm = null;
  $('tool-panel').hidden = true;
  $('tool-result').replaceChildren();
}

async function openTools(id) {
  const device = state.devices.get(id);
  if (!device) return;
  state.toolDevice = id;
  $('tool-panel').hidden = false;
  $('tool-title').textContent = `Run a tool on ${device.name}`;
  $('tool-result').replaceChildren();
  $('tool-fields').replaceChildren(el('p', 'help', 'Loading the tools…'));
  const { status, body } = await api('GET', `/api/devices/${encodeURIComponent(id)}`);
  if (state.toolDevice !== id) return;
  state.tools = status === 200 && Array.isArray(body?.tools) ? body.tools : [];
  const select = $('tool-select');
  select.replaceChildren();
  for (const tool of state.tools) {
    const option = el('option', null, `${tool.name} (${tool.class})`);
    option.value = tool.name;
    select.append(option);
  }
  if (state.tools.length === 0) {
    $('tool-fields').replaceChildren(el('p', 'help', 'This device has not reported any tools yet.'));
    $('tool-description').textContent = '';
  } else {
    selectTool(state.tools[0].name);
  }
  $('tool-title').focus();
}

function selectTool(name) {
  const tool = state.tools.find((t) => t.name === name);
  if (!tool) return;
  $('tool-select').value = name;
  $('tool-description').textContent = tool.description ?? '';
  state.toolForm = buildForm(tool.inputSchema, $('tool-fields'));
  $('tool-result').replaceChildren();
}

async function runTool(event) {
  event.preventDefault();
  if (!state.toolDevice || !state.toolForm) return;
  const result = $('tool-result');
  let input;
  try {
    input = state.toolForm.read();
  } catch (error) {
    if (error instanceof FormError) {
      result.replaceChildren(el('p', 'notice bad', error.message));
      error.control?.focus?.();
      return;
    }
    throw error;
  }
  const tool = $('tool-select').value;
  const run = $('tool-run');
  run.disabled = true;
  result.replaceChildren(el('p', 'help', `Running ${tool}…`));
  try {
    const { status, body } = await api('POST', `/api/devices/${encodeURIComponent(state.toolDevice)}/calls`, { tool, input });
    renderResult(result, status, body);
  } catch (error) {
    result.replaceChildren(el('p', 'notice bad', `The request failed: ${error.message}`));
  } finally {
    run.disabled = false;
  }
}

// ---- proposals ----

const STATUS_WORDS = {
  pending: 'Waiting for a decision',
  applying: 'Applying…',
  applied: 'Applied',
  failed: 'Failed',
  rejected: 'Rejected',
};

function outcomeOf(proposal) {
  if (proposal.status === 'failed') return `Failed: ${describeError(proposal.result?.error ?? 'unknown error')}`;
  if (proposal.status === 'applied') return 'Applied: the change is made on the device.';
  if (proposal.status === 'rejected') return 'Rejected: nothing was changed.';
  return STATUS_WORDS[proposal.status] ?? proposal.status;
}

function renderProposals() {
  const list = $('proposals');
  const proposals = [...state.proposals.values()].sort((a, b) => String(b.createdAt).localeCompare(String(a.createdAt)));
  $('proposals-empty').hidden = proposals.some((p) => p.status === 'pending');
  const keep = new Set(proposals.map((p) => p.id));
  for (const item of [...list.children]) if (!keep.has(item.dataset.id)) item.remove();
  proposals.forEach((proposal, index) => {
    let item = list.querySelector(`li[data-id="${CSS.escape(proposal.id)}"]`);
    if (!item) {
      item = el('li', 'card proposal');
      item.dataset.id = proposal.id;
      const title = el('h3');
      title.id = `proposal-${proposal.id}`;
      item.setAttribute('aria-labelledby', title.id);
      const plan = el('div', 'plan');
      const outcome = el('p', 'outcome');
      outcome.setAttribute('role', 'status');
      const actions = el('div', 'actions');
      actions.append(
        button('Approve', () => decide(proposal.id, 'approve'), 'approve'),
        button('Reject', () => decide(proposal.id, 'reject'), 'danger reject'),
      );
      item.append(el('div', 'card-head'), plan, outcome, actions);
      item.firstChild.append(title, el('span', 'badge'));
      item.dataset.rendered = '';
    }
    if (list.children[index] !== item) list.insertBefore(item, list.children[index] ?? null);
    item.querySelector('h3').textContent = `${proposal.tool} on ${deviceName(proposal.deviceId)}`;
    const badge = item.querySelector('.badge');
    badge.textContent = STATUS_WORDS[proposal.status] ?? proposal.status;
    badge.className = `badge ${proposal.status === 'applied' ? 'online' : proposal.status === 'pending' ? 'offline' : 'revoked'}`;
    const planKey = JSON.stringify(proposal.proposal ?? null);
    if (item.dataset.rendered !== planKey) {
      item.querySelector('.plan').replaceChildren(renderPlan(proposal.proposal));
      item.dataset.rendered = planKey;
    }
    item.querySelector('.outcome').textContent = proposal.status === 'pending' ? '' : outcomeOf(proposal);
    const pending = proposal.status === 'pending';
    item.querySelector('.actions').hidden = !pending;
    for (const b of item.querySelectorAll('.actions button')) {
      if (pending && !item.dataset.busy) b.disabled = false;
    }
  });
}

async function decide(id, verb) {
  const item = $('proposals').querySelector(`li[data-id="${CSS.escape(id)}"]`);
  const buttons = item ? [...item.querySelectorAll('.actions button')] : [];
  for (const b of buttons) b.disabled = true;
  if (item) item.dataset.busy = '1';
  const outcome = item?.querySelector('.outcome');
  if (outcome) outcome.textContent = verb === 'approve' ? 'Applying…' : 'Rejecting…';
  try {
    const { status, body } = await api('POST', `/api/host/${verb}`, { proposalId: id });
    const current = state.proposals.get(id);
    if (verb === 'approve') {
      if (status === 200 && body?.ok) {
        if (current) state.proposals.set(id, { ...current, status: 'applied', result: body });
      } else if (status === 503) {
        if (outcome) outcome.textContent = describeError('device offline');
        if (item) delete item.dataset.busy;
        for (const b of buttons) b.disabled = false;
        return;
      } else if (status === 409) {
        await loadFullProposal(id);
      } else if (current) {
        state.proposals.set(id, { ...current, status: 'failed', result: body ?? { error: `the server answered ${status}` } });
      }
    } else if (status === 200 && body) {
      state.proposals.set(id, body);
    } else if (status === 409) {
      await loadFullProposal(id);
    }
    if (item) delete item.dataset.busy;
    renderProposals();
    const now = state.proposals.get(id);
    if (now) announce(outcomeOf(now));
  } catch (error) {
    if (outcome) outcome.textContent = `The request failed: ${error.message}`;
    if (item) delete item.dataset.busy;
    for (const b of buttons) b.disabled = false;
  }
}

// ---- start ----

function start() {
  state.activation = setupActivation({ api, announce });
  $('sign-in-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('token').value.trim();
    if (!token) {
      $('sign-in-error').textContent = 'Paste an api token first.';
      return;
    }
    $('sign-in-error').textContent = '';
    signIn(token);
  });
  $('sign-out').addEventListener('click', () => signOut('Signed out.'));
  $('pair').addEventListener('click', pair);
  $('pair-copy').addEventListener('click', copyCommand);
  $('tool-select').addEventListener('change', (event) => selectTool(event.target.value));
  $('tool-form').addEventListener('submit', runTool);
  $('tool-close').addEventListener('click', () => {
    const id = state.toolDevice;
    closeTools();
    document.querySelector(`li[data-id="${CSS.escape(id ?? '')}"] .open-tools`)?.focus();
  });
  setInterval(() => {
    if (state.token && state.devices.size > 0) renderDevices();
  }, 30000);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
  else signOut();
}

start();
