// Enrollment by link: /ui/activate?code=ABCD-EFGH (or a code typed in) shows what a device
// asked to be, its name, platform and the folders it will serve, and approves or denies it
// for the signed-in user through /api/device-authorizations/{code}. Plain DOM; server data
// only ever through textContent.

const $ = (id) => document.getElementById(id);

const STATUS_WORDS = {
  pending: 'Waiting for your decision.',
  approved: 'Approved: the device connects within a few seconds.',
  used: 'Approved: the device is connected.',
  denied: 'Denied: the device was told no.',
  expired: 'This code expired. Run host-agent on the device again for a new link.',
};

function fact(list, term, value) {
  const dt = document.createElement('dt');
  dt.textContent = term;
  const dd = document.createElement('dd');
  if (Array.isArray(value)) {
    const items = document.createElement('ul');
    for (const entry of value) {
      const item = document.createElement('li');
      const code = document.createElement('code');
      code.textContent = entry;
      item.append(code);
      items.append(item);
    }
    dd.append(items);
  } else {
    dd.textContent = value;
  }
  list.append(dt, dd);
}

/** Wires the panel; `api(method, path)` is the page's authenticated fetch. */
export function setupActivation({ api, announce }) {
  let code = null;

  function show(authorization) {
    $('activate-details').hidden = false;
    $('activate-name').textContent = authorization.name;
    const facts = $('activate-facts');
    facts.replaceChildren();
    fact(facts, 'Code', authorization.userCode);
    fact(facts, 'Platform', authorization.platform ?? 'not reported');
    fact(facts, 'Folders', authorization.roots.length ? authorization.roots : 'none reported');
    fact(facts, 'Expires', new Date(authorization.expiresAt).toLocaleTimeString());
    const pending = authorization.status === 'pending';
    $('activate-actions').hidden = !pending;
    for (const b of $('activate-actions').querySelectorAll('button')) b.disabled = !pending;
    $('activate-outcome').textContent = STATUS_WORDS[authorization.status] ?? authorization.status;
  }

  function refused(status, body) {
    if (status === 404) return 'No device waits with this code. Check it, or run host-agent on the device again for a new link.';
    if (status === 429) return 'Too many wrong codes: wait a minute, then try again.';
    return body?.error ?? `The server answered ${status}.`;
  }

  async function lookUp(typed) {
    const wanted = typed.trim();
    $('activate-error').textContent = '';
    $('activate-outcome').textContent = '';
    $('activate-details').hidden = true;
    if (!wanted) return;
    code = wanted;
    const { status, body } = await api('GET', `/api/device-authorizations/${encodeURIComponent(wanted)}`);
    if (code !== wanted) return;
    if (status === 200 && body) {
      show(body);
      announce(`Device ${body.name} asks to connect.`);
    } else if (status !== 401) {
      $('activate-error').textContent = refused(status, body);
    }
  }

  async function decide(verb) {
    if (!code) return;
    const buttons = [...$('activate-actions').querySelectorAll('button')];
    for (const b of buttons) b.disabled = true;
    $('activate-error').textContent = '';
    const { status, body } = await api('POST', `/api/device-authorizations/${encodeURIComponent(code)}/${verb}`);
    if ((verb === 'approve' && status === 200) || (verb === 'deny' && status === 204)) {
      $('activate-actions').hidden = true;
      const words = verb === 'approve' ? STATUS_WORDS.approved : STATUS_WORDS.denied;
      $('activate-outcome').textContent = words;
      announce(words);
      return;
    }
    if (status === 409) {
      await lookUp(code);
      return;
    }
    for (const b of buttons) b.disabled = false;
    if (status !== 401) $('activate-error').textContent = refused(status, body);
  }

  $('activate-form').addEventListener('submit', (event) => {
    event.preventDefault();
    lookUp($('activate-code').value);
  });
  $('activate-approve').addEventListener('click', () => decide('approve'));
  $('activate-deny').addEventListener('click', () => decide('deny'));

  return {
    /** Once signed in: the code of the link the page was opened with, looked up at once. */
    start() {
      const fromLink = new URLSearchParams(window.location.search).get('code');
      if (fromLink) {
        $('activate-code').value = fromLink;
        lookUp(fromLink);
      }
      if (window.location.pathname.replace(/\/$/, '').endsWith('/activate')) $('activate-title').focus();
    },
    reset() {
      code = null;
      $('activate-details').hidden = true;
      $('activate-outcome').textContent = '';
      $('activate-error').textContent = '';
    },
  };
}
