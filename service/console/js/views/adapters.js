// Adapters: the tenant's list, and one adapter's versions with their validation metrics, which is
// prod, and promote / roll back / export / delete (delete asks for confirmation in the page).

import { api, download, enc } from "../api.js";
import { h, replace, badge, errorBox, showError, fmtTime, fmtBytes, fmtNum, confirmPanel } from "../dom.js";
import { lifetime } from "../life.js";

const METRIC_KEYS = [["val_accuracy", "val accuracy"], ["val_macro_f1", "val macro-F1"], ["val_loss", "val loss"]];

export function renderList(main) {
  const life = lifetime();
  const body = h("div", {}, h("p", { class: "muted", text: "Loading…" }));
  const err = errorBox(null);
  main.append(h("section", { class: "card" },
    h("div", { class: "row-between" }, h("h1", { text: "Adapters" }),
      h("a", { class: "button primary", href: "#/new-job", text: "Train a new version" })), err, body));
  (async () => {
    try {
      const list = await api("GET", "/v1/adapters");
      if (!life.alive) return;
      if (!list.length) {
        replace(body, h("p", { class: "empty", text: "No adapters yet. Upload labelled data and start a job under New job." }));
        return;
      }
      replace(body, h("table", { class: "grid", id: "adapters-table" },
        h("thead", {}, h("tr", {}, ["name", "task", "versions", "prod", "aliases", "created"].map((c) => h("th", { text: c })))),
        h("tbody", {}, list.map((a) => h("tr", { dataset: { adapter: a.name } },
          h("td", {}, h("a", { href: `#/adapters/${enc(a.name)}`, text: a.name })),
          h("td", { text: a.task || "—" }),
          h("td", { text: a.versions.length }),
          h("td", { text: a.prod === null ? "—" : `v${a.prod}` }),
          h("td", { text: Object.entries(a.aliases).map(([k, v]) => `${k}→v${v}`).join(", ") || "—" }),
          h("td", { text: fmtTime(a.created_at) }))))));
    } catch (e) {
      replace(body);
      showError(err, e);
    }
  })();
  return () => life.stop();
}

export function renderDetail(main, name) {
  const life = lifetime();
  const err = errorBox(null);
  const head = h("div", { class: "row-between" }, h("h1", {}, "Adapter ", h("span", { class: "mono", text: name })));
  const actions = h("div", { class: "actions" });
  const confirmHost = h("div");
  const body = h("div", {}, h("p", { class: "muted", text: "Loading…" }));
  main.append(h("section", { class: "card" }, h("a", { href: "#/adapters", class: "back", text: "← Adapters" }),
                head, actions, confirmHost, err, body));

  async function act(fn) {
    showError(err, null);
    try {
      await fn();
      await load();
    } catch (e) {
      showError(err, e);
    }
  }

  async function exportVersion(version) {
    showError(err, null);
    try {
      const { blob, filename } = await download(`/v1/adapters/${enc(name)}/export?version=${enc(String(version))}`);
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: filename, hidden: true });
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      showError(err, e);
    }
  }

  async function load() {
    const d = await api("GET", `/v1/adapters/${enc(name)}`);
    if (!life.alive) return;
    replace(head, h("h1", {}, "Adapter ", h("span", { class: "mono", text: d.name })),
            h("span", { class: "muted", text: `${d.task || "no task yet"} · prod ${d.prod === null ? "none" : `v${d.prod}`}` }));
    replace(actions,
      h("a", { class: "button", href: `#/playground/${enc(d.name)}`, text: "Try in playground" }),
      h("button", { type: "button", id: "rollback", text: "Roll back prod", disabled: d.prod === null,
                    onclick: () => act(() => api("POST", `/v1/adapters/${enc(name)}/rollback`)) }),
      h("button", { type: "button", id: "delete-adapter", class: "danger", text: "Delete adapter…",
                    onclick: async () => {
                      if (await confirmPanel(confirmHost, `Delete ${d.name} and all ${d.versions.length} versions? This cannot be undone.`, "Delete")) {
                        showError(err, null);
                        try {
                          await api("DELETE", `/v1/adapters/${enc(name)}`);
                          window.location.hash = "#/adapters";
                        } catch (e) {
                          showError(err, e);
                        }
                      }
                    } }));
    const versions = [...d.versions].reverse();
    replace(body, h("h2", { text: "Versions" }), h("table", { class: "grid", id: "versions-table" },
      h("thead", {}, h("tr", {}, ["version", "status", "aliases", ...METRIC_KEYS.map(([, l]) => l), "labels", "made", "source", "size", ""]
        .map((c) => h("th", { text: c })))),
      h("tbody", {}, versions.map((v) => h("tr", { dataset: { version: String(v.version) } },
        h("td", { text: `v${v.version}` }),
        h("td", {}, badge(v.status)),
        h("td", { text: v.aliases.join(", ") || "—" }),
        METRIC_KEYS.map(([k]) => h("td", { class: "num", text: k in v.metrics ? fmtNum(v.metrics[k]) : "—" })),
        h("td", { class: "labels", text: v.labels.join(", ") }),
        h("td", { text: fmtTime(v.created_at) }),
        h("td", {}, v.job_id ? h("a", { href: `#/jobs/${enc(v.job_id)}`, text: "job" }) : (v.source || "—")),
        h("td", { text: fmtBytes(v.nbytes) }),
        h("td", { class: "cell-actions" },
          v.status === "prod" ? null : h("button", { type: "button", class: "promote", text: "Promote",
            onclick: () => act(() => api("POST", `/v1/adapters/${enc(name)}/promote`, { json: { version: v.version } })) }),
          h("button", { type: "button", class: "export", text: "Export", onclick: () => exportVersion(v.version) })))))));
  }

  load().catch((e) => { replace(body); showError(err, e); });
  return () => life.stop();
}
