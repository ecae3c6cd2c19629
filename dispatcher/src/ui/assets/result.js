// Results as people read them: directory entries and search matches as tables, file content
// as text, a mutation's proposal with its diff, truncation flagged, and errors in words.
// Everything from the server goes in through textContent: no server data is ever parsed as
// HTML.

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A failure's text, in words a person acts on. */
export function describeError(error) {
  const text = String(error ?? 'unknown error');
  if (text === 'device offline') return 'The device is offline: nothing was run. Start its agent, then try again.';
  if (text === 'device timed out') return 'The device did not answer in time. It may still have run the tool.';
  if (/outside the allowed roots/.test(text)) return `Refused: that path is outside the folders this device allows. (${text})`;
  if (/changed since the proposal/.test(text)) return `Not applied: the file changed since the proposal was made. (${text})`;
  return `The tool failed: ${text}`;
}

/** A unified diff, each line styled by its kind. */
export function renderDiff(diff) {
  const pre = el('pre', 'diff');
  pre.setAttribute('aria-label', 'Unified diff');
  for (const line of String(diff).replace(/\n$/, '').split('\n')) {
    let kind = '';
    if (line.startsWith('+++') || line.startsWith('---')) kind = 'meta';
    else if (line.startsWith('@@')) kind = 'hunk';
    else if (line.startsWith('+')) kind = 'add';
    else if (line.startsWith('-')) kind = 'del';
    const span = el('span', kind || null, line === '' ? ' ' : line);
    if (kind === 'add') span.setAttribute('aria-label', `added: ${line.slice(1)}`);
    if (kind === 'del') span.setAttribute('aria-label', `removed: ${line.slice(1)}`);
    pre.append(span);
  }
  return pre;
}

function table(headers, rows, numeric = new Set()) {
  const wrap = el('div', 'table-wrap');
  const t = el('table');
  const head = el('tr');
  for (const header of headers) {
    const th = el('th', null, header);
    th.scope = 'col';
    head.append(th);
  }
  const thead = el('thead');
  thead.append(head);
  const tbody = el('tbody');
  for (const row of rows) {
    const tr = el('tr');
    row.forEach((cell, i) => tr.append(el('td', numeric.has(i) ? 'num' : null, cell == null ? '' : String(cell))));
    tbody.append(tr);
  }
  t.append(thead, tbody);
  wrap.append(t);
  return wrap;
}

function truncatedNote(what) {
  return el('p', 'notice', `Truncated: ${what}`);
}

/** The proposal part of a result or a stored proposal: summary, diff or command, preconditions. */
export function renderPlan(plan) {
  const box = el('div');
  if (plan?.summary) box.append(el('p', null, plan.summary));
  if (typeof plan?.diff === 'string' && plan.diff !== '') box.append(renderDiff(plan.diff));
  else if (plan?.diffOmitted) box.append(el('p', 'help', 'The diff is too large for a live update; it is loading.'));
  if (Array.isArray(plan?.command)) box.append(el('pre', null, plan.command.join(' ')));
  return box;
}

/**
 * Renders a dispatch's answer into `container`.
 * @param {number} status HTTP status of the call
 * @param {object} body the HostResult (plus proposalId)
 */
export function renderResult(container, status, body) {
  container.replaceChildren();
  if (!body || typeof body !== 'object') {
    container.append(el('p', 'notice bad', `The server answered ${status} without a result.`));
    return;
  }
  if (!body.ok) {
    const error = body.error ?? `the server answered ${status}`;
    container.append(el('p', 'notice bad', describeError(error)));
    return;
  }
  const result = body.result;
  if (body.proposal) {
    container.append(el('p', 'notice', 'Proposed, nothing changed yet: approve it under Proposals to apply it.'));
    container.append(renderPlan(result));
    if (body.proposalId) container.append(el('p', 'help', `Proposal ${body.proposalId}`));
    return;
  }
  if (result && typeof result === 'object' && !Array.isArray(result)) {
    if (Array.isArray(result.entries)) {
      container.append(el('p', null, `${result.entries.length} entr${result.entries.length === 1 ? 'y' : 'ies'}`));
      container.append(table(['Name', 'Type', 'Size', 'Path'], result.entries.map((e) => [e.name, e.type, e.size, e.path]), new Set([2])));
      if (result.truncated) container.append(truncatedNote('only the first entries are listed.'));
      return;
    }
    if (typeof result.content === 'string') {
      const lines = typeof result.totalLines === 'number' ? `${result.totalLines} line${result.totalLines === 1 ? '' : 's'} in the file` : 'File content';
      container.append(el('p', null, lines));
      const pre = el('pre', 'file-content', result.content);
      pre.setAttribute('aria-label', 'File content');
      pre.tabIndex = 0;
      container.append(pre);
      if (result.truncated) container.append(truncatedNote('the file is larger than what was returned.'));
      return;
    }
    if (result.binary) {
      container.append(el('p', null, `A binary file of ${result.size} bytes: not shown.`));
      return;
    }
    if (Array.isArray(result.matches) && result.matches.every((m) => m && typeof m === 'object')) {
      container.append(el('p', null, `${result.matches.length} match${result.matches.length === 1 ? '' : 'es'}`));
      container.append(table(['Path', 'Line', 'Text'], result.matches.map((m) => [m.path, m.line, m.text]), new Set([1])));
      if (result.truncated) container.append(truncatedNote('there were more matches.'));
      return;
    }
    if (Array.isArray(result.matches)) {
      container.append(el('p', null, `${result.matches.length} match${result.matches.length === 1 ? '' : 'es'}`));
      container.append(table(['Path'], result.matches.map((m) => [m])));
      if (result.truncated) container.append(truncatedNote('there were more matches.'));
      return;
    }
  }
  container.append(el('p', 'ok', 'Done.'));
  container.append(el('pre', null, JSON.stringify(result, null, 2)));
  if (result && result.truncated) container.append(truncatedNote('the result was cut.'));
}
