// A form for a tool's input, built from its JSON Schema (as the agents advertise it: objects,
// strings, enums, booleans, integers, arrays of strings or of objects, `null` unions for
// optional fields, local $refs). Every control has a label tied to it; the description is
// tied with aria-describedby. read() turns the controls back into the input object and throws
// a FormError naming the field when a value does not fit.

export class FormError extends Error {
  constructor(message, control) {
    super(message);
    this.control = control;
  }
}

/** Multi-line text fields, by property name. */
const MULTILINE = new Set(['content', 'find', 'replace', 'text', 'body']);

let counter = 0;
const nextId = (prefix) => `${prefix}-${++counter}`;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') node.textContent = value;
    else if (key in node && typeof value !== 'string') node[key] = value;
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function resolve(schema, root, depth = 0) {
  if (!schema || typeof schema !== 'object' || depth > 16) return schema ?? {};
  if (typeof schema.$ref === 'string' && schema.$ref.startsWith('#/')) {
    const target = schema.$ref
      .slice(2)
      .split('/')
      .reduce((node, key) => (node && typeof node === 'object' ? node[key.replace(/~1/g, '/').replace(/~0/g, '~')] : undefined), root);
    return resolve({ ...target, ...schema, $ref: undefined }, root, depth + 1);
  }
  // anyOf/oneOf of one real schema and null: that schema, optional.
  for (const key of ['anyOf', 'oneOf']) {
    if (Array.isArray(schema[key])) {
      const real = schema[key].filter((s) => !(s && s.type === 'null'));
      if (real.length === 1) return resolve({ ...schema, [key]: undefined, ...real[0] }, root, depth + 1);
    }
  }
  return schema;
}

/** The schema's one non-null type ("string", "object", ...), or null when it has several. */
function typeOf(schema) {
  let type = schema.type;
  if (Array.isArray(type)) {
    const real = type.filter((t) => t !== 'null');
    type = real.length === 1 ? real[0] : null;
  }
  if (!type && schema.properties) type = 'object';
  if (!type && Array.isArray(schema.enum)) type = 'string';
  return type ?? null;
}

function labelText(name, required) {
  return required ? `${name} (required)` : name;
}

function described(control, schema, wrapper) {
  if (!schema.description) return;
  const help = el('p', { class: 'help', id: nextId('desc'), text: schema.description });
  control.setAttribute('aria-describedby', help.id);
  wrapper.append(help);
}

function field(name, rawSchema, required, root) {
  const schema = resolve(rawSchema, root);
  const type = typeOf(schema);
  const wrapper = el('div', { class: 'field' });
  const id = nextId('field');

  if (type === 'object' && schema.properties) {
    const fieldset = el('fieldset', {}, el('legend', { text: labelText(name, required) }));
    const inner = objectFields(schema, root, fieldset);
    wrapper.append(fieldset);
    return { element: wrapper, read: () => inner.read() };
  }

  if (type === 'boolean') {
    const input = el('input', { type: 'checkbox', id, name });
    wrapper.append(el('label', { class: 'inline', for: id }, input, document.createTextNode(name)));
    described(input, schema, wrapper);
    return { element: wrapper, read: () => (input.checked ? true : required ? false : undefined) };
  }

  if (type === 'integer' || type === 'number') {
    const input = el('input', { type: 'number', id, name, inputmode: 'numeric', step: type === 'integer' ? '1' : 'any' });
    if (typeof schema.minimum === 'number') input.min = String(schema.minimum);
    if (typeof schema.maximum === 'number') input.max = String(schema.maximum);
    wrapper.append(el('label', { for: id, text: labelText(name, required) }), input);
    described(input, schema, wrapper);
    return {
      element: wrapper,
      read: () => {
        const text = input.value.trim();
        if (text === '') {
          if (required) throw new FormError(`${name} is required`, input);
          return undefined;
        }
        const value = Number(text);
        if (!Number.isFinite(value) || (type === 'integer' && !Number.isInteger(value))) {
          throw new FormError(`${name} must be ${type === 'integer' ? 'a whole number' : 'a number'}`, input);
        }
        if (typeof schema.minimum === 'number' && value < schema.minimum) throw new FormError(`${name} must be at least ${schema.minimum}`, input);
        if (typeof schema.maximum === 'number' && value > schema.maximum) throw new FormError(`${name} must be at most ${schema.maximum}`, input);
        return value;
      },
    };
  }

  if (type === 'string' && Array.isArray(schema.enum)) {
    const select = el('select', { id, name });
    const values = schema.enum.filter((v) => v !== null);
    if (!required) select.append(el('option', { value: '', text: schema.default != null ? `default (${schema.default})` : 'default' }));
    for (const value of values) select.append(el('option', { value: String(value), text: String(value) }));
    wrapper.append(el('label', { for: id, text: labelText(name, required) }), select);
    described(select, schema, wrapper);
    return { element: wrapper, read: () => (select.value === '' ? undefined : select.value) };
  }

  if (type === 'string') {
    const multiline = MULTILINE.has(name);
    const input = multiline ? el('textarea', { id, name, rows: 5, spellcheck: 'false' }) : el('input', { type: 'text', id, name, spellcheck: 'false', autocomplete: 'off' });
    wrapper.append(el('label', { for: id, text: labelText(name, required) }), input);
    described(input, schema, wrapper);
    return {
      element: wrapper,
      read: () => {
        if (input.value === '' && !required) return undefined;
        if (input.value === '' && required && !multiline) throw new FormError(`${name} is required`, input);
        return input.value;
      },
    };
  }

  if (type === 'array') {
    const items = resolve(schema.items ?? {}, root);
    if (typeOf(items) === 'string' && !Array.isArray(items.enum)) {
      const area = el('textarea', { id, name, rows: 3, spellcheck: 'false' });
      wrapper.append(el('label', { for: id, text: `${labelText(name, required)}, one per line` }), area);
      described(area, schema, wrapper);
      return {
        element: wrapper,
        read: () => {
          const lines = area.value.split('\n').filter((line) => line !== '');
          if (lines.length === 0 && !required) return undefined;
          return lines;
        },
      };
    }
    return arrayOfItems(name, schema, items, required, root, wrapper);
  }

  // Anything else: JSON typed by hand.
  const area = el('textarea', { id, name, rows: 3, spellcheck: 'false' });
  wrapper.append(el('label', { for: id, text: `${labelText(name, required)} (JSON)` }), area);
  described(area, schema, wrapper);
  return {
    element: wrapper,
    read: () => {
      if (area.value.trim() === '') {
        if (required) throw new FormError(`${name} is required`, area);
        return undefined;
      }
      try {
        return JSON.parse(area.value);
      } catch {
        throw new FormError(`${name} is not valid JSON`, area);
      }
    },
  };
}

function arrayOfItems(name, schema, items, required, root, wrapper) {
  const fieldset = el('fieldset', {}, el('legend', { text: labelText(name, required) }));
  if (schema.description) fieldset.append(el('p', { class: 'help', text: schema.description }));
  const list = el('div');
  const rows = [];
  const add = el('button', { type: 'button', text: `Add ${name} item` });
  const addRow = () => {
    const index = rows.length + 1;
    const item = field(`${name} ${index}`, items, true, root);
    const remove = el('button', { type: 'button', text: `Remove ${name} ${index}` });
    const row = el('div', { class: 'array-item' }, item.element, remove);
    const entry = { row, read: item.read };
    remove.addEventListener('click', () => {
      rows.splice(rows.indexOf(entry), 1);
      row.remove();
      add.focus();
    });
    rows.push(entry);
    list.append(row);
  };
  add.addEventListener('click', () => {
    addRow();
    rows[rows.length - 1].row.querySelector('input, textarea, select')?.focus();
  });
  const initial = Math.max(typeof schema.minItems === 'number' ? schema.minItems : 0, required ? 1 : 0);
  for (let i = 0; i < initial; i++) addRow();
  fieldset.append(list, add);
  wrapper.append(fieldset);
  return {
    element: wrapper,
    read: () => {
      const values = rows.map((entry) => entry.read());
      if (typeof schema.minItems === 'number' && values.length < schema.minItems) {
        throw new FormError(`${name} needs at least ${schema.minItems} item${schema.minItems === 1 ? '' : 's'}`, add);
      }
      if (values.length === 0 && !required) return undefined;
      return values;
    },
  };
}

function objectFields(schema, root, container) {
  const required = new Set(Array.isArray(schema.required) ? schema.required : []);
  const entries = Object.entries(schema.properties ?? {});
  // Required fields first, in the schema's order otherwise.
  entries.sort(([a], [b]) => Number(required.has(b)) - Number(required.has(a)));
  const fields = entries.map(([name, propertySchema]) => {
    const built = field(name, propertySchema, required.has(name), root);
    container.append(built.element);
    return [name, built];
  });
  return {
    read: () => {
      const value = {};
      for (const [name, built] of fields) {
        const read = built.read();
        if (read !== undefined) value[name] = read;
      }
      return value;
    },
  };
}

/**
 * Fills `container` with controls for `schema` (a tool's inputSchema).
 * @returns {{read: () => object}}
 */
export function buildForm(schema, container) {
  container.replaceChildren();
  const root = schema ?? {};
  const resolved = resolve(root, root);
  if (typeOf(resolved) === 'object' && resolved.properties && Object.keys(resolved.properties).length > 0) {
    return objectFields(resolved, root, container);
  }
  if (typeOf(resolved) === 'object' || !schema) {
    container.append(el('p', { class: 'help', text: 'This tool takes no input.' }));
    return { read: () => ({}) };
  }
  const built = field('input', resolved, true, root);
  container.append(built.element);
  return { read: () => built.read() };
}
