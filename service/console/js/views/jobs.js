// Jobs: the tenant's latest jobs with status and progress, refreshed every 2 s.

import { api, enc } from "../api.js";
import { h, replace, badge, bar, errorBox, showError, fmtTime } from "../dom.js";
import { lifetime } from "../life.js";

export const ACTIVE = new Set(["queued", "validating", "running"]);

export function progressCell(j) {
  const p = j.progress || {};
  const f = j.status === "succeeded" ? 1 : typeof p.fraction === "number" ? p.fraction : 0;
  const text = j.status === "queued" && j.queue_position ? `queued: position ${j.queue_position}`
    : typeof p.step === "number" ? `${p.step}/${p.total_steps} steps` : `${Math.round(f * 100)}%`;
  return h("span", { class: "progress-cell" }, bar(f, "progress"), h("span", { class: "muted", text }));
}

export function render(main) {
  const life = lifetime();
  const err = errorBox(null);
  const body = h("div", {}, h("p", { class: "muted", text: "Loading…" }));
  main.append(h("section", { class: "card" },
    h("div", { class: "row-between" }, h("h1", { text: "Jobs" }),
      h("a", { class: "button primary", href: "#/new-job", text: "New job" })), err, body));
  life.every(async () => {
    let list;
    try {
      list = await api("GET", "/v1/jobs", { query: { limit: 50 } });
    } catch (e) {
      showError(err, e);
      return true;
    }
    if (!life.alive) return false;
    showError(err, null);
    if (!list.length) {
      replace(body, h("p", { class: "empty", text: "No jobs yet." }));
      return true;
    }
    replace(body, h("table", { class: "grid", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["job", "adapter", "task", "status", "progress", "version", "created", "finished"].map((c) => h("th", { text: c })))),
      h("tbody", {}, list.map((j) => h("tr", { dataset: { job: j.id } },
        h("td", {}, h("a", { href: `#/jobs/${enc(j.id)}`, class: "mono", text: j.id })),
        h("td", { text: j.adapter }),
        h("td", { text: j.task }),
        h("td", {}, badge(j.status)),
        h("td", {}, progressCell(j)),
        h("td", { text: j.version ? `v${j.version}` : "—" }),
        h("td", { text: fmtTime(j.created_at) }),
        h("td", { text: fmtTime(j.finished_at) }))))));
    return true;
  }, 2000);
  return () => life.stop();
}
