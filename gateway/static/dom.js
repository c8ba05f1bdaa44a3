// Building the page from data: every text goes in as a text node (textContent), never as HTML. Names, messages
// and transcripts are customer text.

const PROPERTIES = new Set(["value", "checked", "disabled", "selected", "hidden", "open", "required", "multiple"]);

/** How often the views that refresh themselves do, and how they say so. */
export const REFRESH_MS = 5000;
export const REFRESHES = `refreshes every ${REFRESH_MS / 1000} s`;

/** el("button", {class: "primary", onclick: fn, text: "Go"}, ...children): children are nodes or plain text. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) {
      // a handler is a function, never text: an on* attribute would be inline code (and the policy blocks it)
      if (typeof value !== "function") throw new TypeError(`el(${tag}): ${name} must be a function`);
      node.addEventListener(name.slice(2), value);
    }
    else if (PROPERTIES.has(name)) node[name] = value;
    else if (value !== false) node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace what `node` holds with `children`. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** A labelled input: the label wraps it. */
export function field(label, input) {
  return el("label", {}, label, input);
}

/** A status as a badge, coloured by `tone` (a status name; the status itself by default). */
export function badge(status, tone = status) {
  const text = String(status ?? "unknown");
  return el("span", { class: `badge ${String(tone ?? "").replace(/[^a-z_]/g, "")}`, text });
}

export function when(at) {
  if (!at) return "";
  const date = new Date(at);
  return Number.isNaN(date.getTime()) ? String(at) : date.toLocaleString();
}

/** A table: columns are [label, (row) => text or node]; an empty list shows `empty`. */
export function table(columns, rows, empty = "Nothing yet.") {
  if (!rows || rows.length === 0) return el("p", { class: "empty", text: empty });
  return el(
    "table",
    {},
    el("thead", {}, el("tr", {}, columns.map(([label]) => el("th", { text: label })))),
    el(
      "tbody",
      {},
      rows.map((row) =>
        el(
          "tr",
          {},
          columns.map(([label, cell]) => {
            const value = cell(row);
            return el("td", { class: label === "" ? "actions" : undefined }, value instanceof Node ? value : String(value ?? ""));
          }),
        ),
      ),
    ),
  );
}

/** The details of a 422, when they are one {field, message} per field (control/errors.py invalid_input), else null. */
function fieldErrors(details) {
  const fields = Array.isArray(details) && details.length > 0;
  return fields && details.every((d) => d && typeof d === "object" && "field" in d && "message" in d) ? details : null;
}

/** Show an API error (or any error) in `slot`, next to what failed. */
export function showError(slot, error) {
  if (!slot) return;
  if (error && error.name === "AbortError") return;
  const status = error && error.status ? `${error.status} ` : "";
  const code = error && error.code ? error.code : "error";
  let message = error && error.message ? error.message : String(error);
  const details = error && error.details !== null && error.details !== undefined ? error.details : null;
  const fields = fieldErrors(details);
  if (fields) message = message.replace(/:.*$/s, ""); // "invalid request: <the first fields>": listed below, each
  fill(
    slot,
    el(
      "div",
      { class: "error", role: "alert" },
      el("strong", { text: `${status}${code}` }),
      ": ",
      message,
      fields
        ? el("ul", {}, fields.map((d) => el("li", { text: `${d.field}: ${d.message}` })))
        : details !== null
          ? el("pre", { text: JSON.stringify(details, null, 2) })
          : null,
    ),
  );
}

export function showNotice(slot, ...children) {
  fill(slot, el("div", { class: "notice", role: "status" }, ...children));
}

/**
 * Run `action` for a button or form: the button is disabled meanwhile, `slot` is cleared first and shows the
 * error if it fails. Returns the action's value, or undefined after an error.
 */
export async function attempt(slot, action, button = null) {
  if (slot) slot.replaceChildren();
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (error) {
    showError(slot, error);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

/**
 * A button that runs `action` when clicked (after `confirm`, a question, is answered yes, when it is given), through
 * attempt(): disabled meanwhile, `slot` cleared first and showing the error if it fails. `then` (a reload) runs
 * after it succeeded. `cls` and `disabled` are the button's own.
 */
export function actionButton(label, action, { slot = null, then = null, confirm = null, cls = "", disabled = false } = {}) {
  const button = el("button", { type: "button", class: cls || undefined, text: label, disabled });
  button.addEventListener("click", async () => {
    if (confirm && !window.confirm(confirm)) return;
    const done = await attempt(
      slot,
      async () => {
        await action();
        return true;
      },
      button,
    );
    if (done && then) then();
  });
  return button;
}

/** "1 agent", "2 agents": a count and its noun (the plural by an s). */
export function counted(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

/** A number from an input, or null when it is empty (what is not a number is sent as written: the API says why). */
export function numberOrNull(input) {
  const text = input.value.trim();
  if (text === "") return null;
  const number = Number(text);
  return Number.isFinite(number) ? number : text;
}

/**
 * Run `task` (a load: it may return a promise) now, then every `ms` while the page is visible, never while the
 * previous run is still going (a slow API gets no pile of loads). Returns the function that stops it.
 */
export function every(ms, task) {
  let running = false;
  async function run() {
    if (running) return;
    running = true;
    try {
      await task();
    } catch (error) {
      console.error(error); // a load shows its own errors (attempt); this is what escaped it
    } finally {
      running = false;
    }
  }
  run();
  const timer = setInterval(() => {
    if (!document.hidden) run();
  }, ms);
  return () => clearInterval(timer);
}
