// Operator view (admin key): service health from /readyz and the service's own Prometheus
// /metrics; tenants with their adapter, version, file, key and job counts (GET /v1/usage); create
// a tenant (its key shown once, with a copy button); list, create and revoke a tenant's keys.

import { api, ApiError, enc, metricsText, readyz } from "../api.js";
import { h, replace, errorBox, showError, fmtBytes, fmtNum, fmtTime, confirmPanel, NAME_RE } from "../dom.js";
import { lifetime } from "../life.js";
import { parse, summary } from "../metrics.js";

// A secret shown once: a read-only field and a copy button (the clipboard, never a log).
function secretBox(title, secret) {
  const field = h("input", { class: "mono secret", readonly: true, value: secret, id: "new-key", "aria-label": title });
  const note = h("span", { class: "muted", role: "status" });
  const copy = h("button", { type: "button", id: "copy-key", text: "Copy", onclick: async () => {
    try {
      await navigator.clipboard.writeText(field.value);
      note.textContent = "Copied.";
    } catch {
      field.select();
      note.textContent = "Select and copy it by hand (the clipboard is not available here).";
    }
  } });
  return h("div", { class: "secret-box", role: "region", "aria-label": title },
    h("p", {}, h("strong", { text: title }), " Shown only now: the service keeps only a hash of it."),
    h("div", { class: "row" }, field, copy, note));
}

function healthView(host, life) {
  const err = errorBox(null);
  const body = h("div", { id: "health" }, h("p", { class: "muted", text: "Loading…" }));
  host.append(h("section", { class: "card" }, h("h2", { text: "Service health" }), err, body));
  life.every(async () => {
    const [ready, text] = await Promise.all([readyz(), metricsText().catch((e) => { showError(err, e); return ""; })]);
    if (!life.alive) return false;
    const s = summary(parse(text));
    const tiles = [["Ready", ready ? "yes" : "no", ready ? "ok" : "bad"]];
    const taskRows = Object.entries(s.tasks).map(([task, t]) => h("tr", {},
      h("th", { scope: "row", text: task }),
      h("td", { class: "num", text: fmtNum(t.resident) }),
      h("td", { class: "num", text: fmtBytes(t.residentBytes) }),
      h("td", { class: "num", text: t.hitRate === null ? "—" : `${(t.hitRate * 100).toFixed(1)}%` }),
      h("td", { class: "num", text: fmtNum(t.batches) }),
      h("td", { class: "num", text: t.meanBatch === null ? "—" : t.meanBatch.toFixed(2) }),
      h("td", { class: "num", text: t.meanAdapters === null ? "—" : t.meanAdapters.toFixed(2) }),
      h("td", { class: "num", text: fmtNum(t.rows) })));
    const jobs = Object.entries(s.jobs).filter(([, n]) => n > 0);
    replace(body,
      h("div", { class: "tiles" }, tiles.map(([k, v, cls]) => h("div", { class: `tile ${cls}` }, h("span", { class: "tile-k", text: k }), h("span", { class: "tile-v", id: "health-ready", text: v })))),
      h("table", { class: "grid", id: "health-tasks" },
        h("thead", {}, h("tr", {}, ["task", "resident adapters", "resident bytes", "cache hit rate", "batches", "mean batch rows", "mean adapters / batch", "rows predicted"].map((c) => h("th", { text: c })))),
        h("tbody", {}, taskRows.length ? taskRows : h("tr", {}, h("td", { colspan: 8, class: "muted", text: "no engine metrics yet" })))),
      h("p", { id: "health-jobs" }, h("strong", { text: "Jobs by status: " }),
        jobs.length ? jobs.map(([st, n]) => `${st} ${n}`).join(" · ") : "none"));
    showError(err, null);
    return true;
  }, 5000);
}

function keysPanel(tenant, onChange) {
  const err = errorBox(null);
  const list = h("div");
  const fresh = h("div");
  const confirmHost = h("div");
  async function load() {
    const keys = await api("GET", `/v1/tenants/${enc(tenant)}/keys`);
    replace(list, h("table", { class: "grid keys" },
      h("thead", {}, h("tr", {}, ["key id", "prefix", "created", "state", ""].map((c) => h("th", { text: c })))),
      h("tbody", {}, keys.map((k) => h("tr", { dataset: { key: k.key_id } },
        h("td", { class: "mono", text: k.key_id }), h("td", { class: "mono", text: `${k.prefix}…` }),
        h("td", { text: fmtTime(k.created_at) }), h("td", { text: k.active ? "active" : `revoked ${fmtTime(k.revoked_at)}` }),
        h("td", {}, k.active ? h("button", { type: "button", class: "danger revoke", text: "Revoke…", onclick: async () => {
          if (!(await confirmPanel(confirmHost, `Revoke key ${k.prefix}… of ${tenant}? Requests with it are refused at once.`, "Revoke"))) return;
          try { await api("DELETE", `/v1/tenants/${enc(tenant)}/keys/${enc(k.key_id)}`); await load(); onChange(); } catch (e) { showError(err, e); }
        } }) : null))))));
  }
  const panel = h("div", { class: "keys-panel", dataset: { tenant } },
    h("div", { class: "row-between" }, h("h3", {}, "Keys of ", h("span", { class: "mono", text: tenant })),
      h("button", { type: "button", class: "create-key", text: "Create key", onclick: async () => {
        showError(err, null);
        try {
          const k = await api("POST", `/v1/tenants/${enc(tenant)}/keys`);
          replace(fresh, secretBox(`New key for ${tenant}.`, k.api_key));
          await load();
          onChange();
        } catch (e) { showError(err, e); }
      } })),
    confirmHost, err, fresh, list);
  load().catch((e) => showError(err, e));
  return panel;
}

function tenantsView(host, life) {
  const err = errorBox(null);
  const body = h("div", { id: "tenants" }, h("p", { class: "muted", text: "Loading…" }));
  const keysHost = h("div", { id: "keys-host" });
  const name = h("input", { id: "tenant-name", autocomplete: "off", placeholder: "e.g. acme" });
  const createErr = errorBox(null);
  createErr.id = "tenant-error";
  const created = h("div", { id: "tenant-created" });
  const form = h("form", { class: "row", id: "tenant-form", method: "post", action: "" },
    h("label", { for: "tenant-name", text: "New tenant" }), name, h("button", { type: "submit", class: "primary", text: "Create tenant" }));

  async function load() {
    const usage = await api("GET", "/v1/usage");
    if (!life.alive) return;
    replace(body, usage.length ? h("table", { class: "grid", id: "tenants-table" },
      h("thead", {}, h("tr", {}, ["tenant", "adapters", "versions", "storage", "files", "active keys", "jobs", ""].map((c) => h("th", { text: c })))),
      h("tbody", {}, usage.map((u) => h("tr", { dataset: { tenant: u.tenant } },
        h("th", { scope: "row", class: "mono", text: u.tenant }),
        h("td", { class: "num adapters", text: u.adapters }),
        h("td", { class: "num", text: u.versions }),
        h("td", { class: "num", text: fmtBytes(u.adapter_bytes + u.file_bytes) }),
        h("td", { class: "num", text: u.files }),
        h("td", { class: "num", text: u.active_keys }),
        h("td", { class: "jobs", text: Object.entries(u.jobs).map(([s, n]) => `${s} ${n}`).join(" · ") || "none" }),
        h("td", {}, h("button", { type: "button", class: "show-keys", text: "Keys",
          onclick: () => replace(keysHost, keysPanel(u.tenant, () => load().catch((e) => showError(err, e)))) }))))))
      : h("p", { class: "empty", text: "No tenants yet." }));
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(createErr, null);
    const n = name.value.trim();
    try {
      if (!NAME_RE.test(n)) throw new ApiError(0, "invalid_name", "1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit", "name");
      const t = await api("POST", "/v1/tenants", { json: { name: n } });
      name.value = "";
      replace(created, secretBox(`API key of tenant ${t.name}.`, t.api_key));
      await load();
    } catch (e2) {
      showError(createErr, e2);
    }
  });
  host.append(h("section", { class: "card" }, h("h2", { text: "Tenants" }), form, createErr, created, err, body, keysHost));
  life.every(async () => {
    try {
      await load();
      showError(err, null);
    } catch (e) {
      showError(err, e);
    }
    return true;
  }, 10000);
}

export function render(main) {
  const life = lifetime();
  main.append(h("h1", { text: "Operator" }));
  healthView(main, life);
  tenantsView(main, life);
  return () => life.stop();
}
