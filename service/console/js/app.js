// The console's shell: sign-in, navigation and a hash router (#/adapters, #/jobs/ID, ...).
//
// The route (the part after "#") never holds the key. A view is render(main, params) returning an
// optional cleanup function (stops its polling) that runs when the route changes. A tenant key sees
// the tenant views, the admin key the operator view; the API decides what either may do.

import { api, ApiError, onSignedOut, session } from "./api.js";
import { h, replace, errorBox, showError } from "./dom.js";
import * as adapters from "./views/adapters.js";
import * as jobs from "./views/jobs.js";
import * as job from "./views/job.js";
import * as newJob from "./views/new_job.js";
import * as playground from "./views/playground.js";
import * as operator from "./views/operator.js";

const TENANT_NAV = [["#/adapters", "Adapters"], ["#/jobs", "Jobs"], ["#/new-job", "New job"], ["#/playground", "Playground"]];
const ADMIN_NAV = [["#/operator", "Operator"]];

// [pattern, view, role]: the first match wins; groups become params.
const ROUTES = [
  [/^\/adapters$/, adapters.renderList, "tenant"],
  [/^\/adapters\/([^/]+)$/, adapters.renderDetail, "tenant"],
  [/^\/jobs$/, jobs.render, "tenant"],
  [/^\/jobs\/([^/]+)$/, job.render, "tenant"],
  [/^\/new-job$/, newJob.render, "tenant"],
  [/^\/playground(?:\/([^/]+))?$/, playground.render, "tenant"],
  [/^\/operator$/, operator.render, "admin"],
];

const main = document.getElementById("view");
let cleanup = null;
let signOutNotice = null;

function home() { return session.role === "admin" ? "#/operator" : "#/adapters"; }

function drawChrome() {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  const role = session.key ? session.role : null;
  const links = role === "admin" ? ADMIN_NAV : role === "tenant" ? TENANT_NAV : [];
  const current = window.location.hash.split("/").slice(0, 2).join("/");
  replace(nav, links.map(([href, label]) => h("a", { href, text: label, class: href === current ? "active" : null })));
  replace(who, role ? [h("span", { class: "role", text: role === "admin" ? "operator (admin key)" : "tenant" }),
                       h("button", { type: "button", id: "sign-out", text: "Sign out", onclick: signOut })] : []);
}

function signOut() {
  session.signOut();
  window.location.hash = "#/signin";
}

function renderSignIn(host) {
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off",
                             spellcheck: "false", required: true, placeholder: "tk-... or the admin key" });
  const err = errorBox(null);
  const form = h("form", { class: "card signin", method: "post", action: "" },
    h("h1", { text: "Sign in" }),
    h("p", { class: "muted", text: "Paste an API key. It stays in this tab only (session storage) and is sent in a header, never in a link." }),
    h("label", { for: "api-key", text: "API key" }), input,
    h("button", { type: "submit", class: "primary", text: "Sign in" }), err);
  if (signOutNotice) {
    showError(err, signOutNotice);
    signOutNotice = null;
  }
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    input.value = "";
    if (!key) return;
    showError(err, null);
    try {
      const role = await detectRole(key);
      session.signIn(key, role);
      window.location.hash = home();
    } catch (e2) {
      showError(err, e2);
    }
  });
  replace(host, form);
  input.focus();
}

// The admin key may list tenants; a tenant key gets 403 there and may list its adapters.
async function detectRole(key) {
  try {
    await api("GET", "/v1/tenants", { key });
    return "admin";
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 403) throw e;
  }
  await api("GET", "/v1/adapters", { key });
  return "tenant";
}

function route() {
  if (cleanup) { try { cleanup(); } catch { /* a view's cleanup never blocks navigation */ } }
  cleanup = null;
  drawChrome();
  const path = window.location.hash.replace(/^#/, "") || "/";
  if (!session.key) {
    if (path !== "/signin") { window.location.hash = "#/signin"; return; }
    renderSignIn(main);
    return;
  }
  for (const [pattern, view, role] of ROUTES) {
    const m = pattern.exec(path);
    if (!m) continue;
    if (role !== session.role) break;
    let params;
    try {
      params = m.slice(1).map((p) => (p === undefined ? undefined : decodeURIComponent(p)));
    } catch {
      break;
    }
    replace(main);
    cleanup = view(main, ...params) || null;
    main.focus({ preventScroll: true });
    return;
  }
  window.location.hash = home();
}

onSignedOut((err) => {
  signOutNotice = new ApiError(err.status, err.code, `Signed out: ${err.message}`);
  if (window.location.hash === "#/signin") route();
  else window.location.hash = "#/signin";
});
window.addEventListener("hashchange", route);
route();
