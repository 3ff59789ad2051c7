// DOM helpers: every string becomes a text node or an attribute value, never markup.
//
// h(tag, attrs, ...children) builds an element. attrs: "class", "text" (textContent), "on<event>"
// (a function), "dataset" (an object), "hidden"/"disabled"/... (booleans), anything else via
// setAttribute (never "style" or "on*" strings: the page's CSP forbids inline style and script).
// Children: strings and numbers become text nodes; Nodes are appended; arrays are flattened;
// null/undefined/false are skipped. Nothing here parses HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "style" || key.startsWith("on")) throw new Error(`refusing attribute ${key}`);
    else if (value === true) el.setAttribute(key, "");
    else if (key === "value" && "value" in el) el.value = String(value);
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  return append(el, children);
}

export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function fmtBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

export function fmtNum(x, digits = 4) {
  if (typeof x !== "number") return x === null || x === undefined ? "" : String(x);
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

// A horizontal bar for a fraction in [0, 1] (width through the CSSOM, which the CSP allows).
export function bar(fraction, label) {
  const f = Math.max(0, Math.min(1, Number(fraction) || 0));
  const fill = h("span", { class: "bar-fill" });
  fill.style.width = `${(f * 100).toFixed(1)}%`;
  return h("span", { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": 1,
                     "aria-valuenow": f.toFixed(4), "aria-label": label || "" }, fill);
}

// A status word as a badge (the class is chosen from a fixed list, never from the data).
const BADGES = new Set(["queued", "validating", "running", "succeeded", "failed", "cancelled",
                        "prod", "retired", "candidate"]);
export function badge(status) {
  const s = String(status);
  return h("span", { class: `badge${BADGES.has(s) ? ` badge-${s}` : ""}`, text: s });
}

// An error box: the API's message and the field it names, as text.
export function errorBox(err) {
  if (!err) return h("div", { class: "error", role: "alert", hidden: true });
  const box = h("div", { class: "error", role: "alert" }, h("span", { class: "error-message", text: err.message }));
  if (err.param) box.appendChild(h("span", { class: "error-param", text: ` (${err.param})` }));
  return box;
}

export function showError(box, err) {
  replace(box, err ? [h("span", { class: "error-message", text: err.message }),
                      err.param ? h("span", { class: "error-param", text: ` (${err.param})` }) : null] : []);
  box.hidden = !err;
}

// A value as one line of text: lists of plain values comma-separated, other objects as JSON.
function shown(v) {
  if (Array.isArray(v) && !v.length) return "none";
  if (Array.isArray(v) && v.every((x) => x === null || typeof x !== "object")) return v.map((x) => fmtNum(x)).join(", ");
  return typeof v === "object" && v !== null ? JSON.stringify(v) : fmtNum(v);
}

// A two-column table of an object's keys and values (as text).
export function kvTable(obj, cls = "kv") {
  const rows = Object.entries(obj || {}).map(([k, v]) => h("tr", {},
    h("th", { scope: "row", text: k }),
    h("td", { text: shown(v) })));
  return h("table", { class: cls }, h("tbody", {}, rows));
}

// An in-page confirmation (no window.confirm): resolves true when "confirm" is clicked.
export function confirmPanel(host, question, confirmLabel) {
  return new Promise((resolve) => {
    const panel = h("div", { class: "confirm", role: "alertdialog", "aria-label": "confirm" },
      h("p", { text: question }),
      h("button", { class: "danger", type: "button", text: confirmLabel || "Confirm",
                    onclick: () => { panel.remove(); resolve(true); } }),
      h("button", { type: "button", text: "Cancel", onclick: () => { panel.remove(); resolve(false); } }));
    host.appendChild(panel);
    panel.querySelector("button.danger").focus();
  });
}

export const NAME_RE = /^[a-z0-9][a-z0-9_-]{0,62}$/;
