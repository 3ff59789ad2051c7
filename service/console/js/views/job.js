// One job: live training-loss and validation curves (polling GET /v1/jobs/{id} and its events),
// progress, events, hyper-parameters as resolved, dataset, the gate's decision and why; cancel.
//
// Step events (data.total_steps: the loss every few steps) and epoch events (data.epoch with
// val_accuracy or, for text generation, val_perplexity: the epoch's mean training loss at its last
// step, and the validation metrics) draw the curves; the validation chart is drawn for the job's task;
// both are keyed by step/epoch, so a resumed job's repeats do not double.
// The chart hosts carry data-points (how many samples they draw) for tests and screen readers.

import { api, enc } from "../api.js";
import { h, replace, badge, bar, errorBox, showError, fmtTime, kvTable } from "../dom.js";
import { lifetime } from "../life.js";
import { lossChart, validationChart } from "../charts.js";
import { ACTIVE } from "./jobs.js";

const POLL_MS = 1000;

export function render(main, id) {
  const life = lifetime();
  const err = errorBox(null);
  const title = h("h1", {}, "Job ", h("span", { class: "mono", text: id }));
  const status = h("div", { class: "job-status" });
  const actions = h("div", { class: "actions" });
  const lossHost = h("div", { class: "chart", id: "loss-chart", dataset: { points: "0" } });
  const valHost = h("div", { class: "chart", id: "val-chart", dataset: { points: "0" } });
  const gate = h("div", { id: "gate" });
  const hp = h("div", { id: "hyperparameters" });
  const dataset = h("div", { id: "dataset" });
  const events = h("ol", { class: "events", id: "events" });
  main.append(
    h("section", { class: "card" }, h("a", { href: "#/jobs", class: "back", text: "← Jobs" }), title, status, actions, err),
    h("section", { class: "card charts" }, h("div", { class: "chart-wrap" }, lossHost), h("div", { class: "chart-wrap" }, valHost)),
    h("div", { class: "columns" },
      h("section", { class: "card" }, h("h2", { text: "Promotion gate" }), gate),
      h("section", { class: "card" }, h("h2", { text: "Hyper-parameters" }), hp),
      h("section", { class: "card" }, h("h2", { text: "Data" }), dataset)),
    h("section", { class: "card" }, h("h2", { text: "Events" }), events));

  const loss = lossChart(lossHost);
  let val = null;  // drawn once the job's task is known
  const steps = new Map();
  const epochs = new Map();
  let after = 0;

  function addEvents(list) {
    let lossChanged = false;
    let valChanged = false;
    for (const e of list) {
      after = Math.max(after, e.id);
      const d = e.data && typeof e.data === "object" ? e.data : null;
      if (e.type === "metrics" && d && typeof d.epoch === "number"
          && (typeof d.val_accuracy === "number" || typeof d.val_perplexity === "number")) {
        epochs.set(d.epoch, d);
        valChanged = true;
        continue;
      }
      if (e.type === "metrics" && d && typeof d.step === "number" && typeof d.train_loss === "number") {
        steps.set(d.step, d);
        lossChanged = true;
        continue;  // one line per step would drown the log: the curve shows them
      }
      const atEnd = events.scrollTop + events.clientHeight >= events.scrollHeight - 4;
      events.appendChild(h("li", { class: `event level-${["error", "warning"].includes(e.level) ? e.level : "info"}` },
        h("time", { text: fmtTime(e.at) }), h("span", { class: "event-message", text: e.message })));
      if (atEnd) events.scrollTop = events.scrollHeight;  // follow the log unless the reader scrolled up
    }
    if (lossChanged || valChanged) {
      const epochLoss = [...epochs.values()].filter((d) => typeof d.step === "number" && typeof d.train_loss === "number");
      lossHost.dataset.points = String(loss.update([...steps.values()], epochLoss));
    }
    if (valChanged && val) {
      const pts = [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
      val.update(pts);
      valHost.dataset.points = String(pts.length);
    }
  }

  // The decision's figures as rows: each scored side's scalar metrics, the baseline rate, other scalars.
  function gateFigures(g) {
    const rows = {};
    const side = (name, m) => {
      if (m && typeof m === "object") {
        for (const [k, v] of Object.entries(m)) if (typeof v !== "object" || v === null) rows[`${name} ${k}`] = v;
      }
    };
    side("candidate", g.candidate);
    if (g.prod) side(`prod v${g.prod_version}`, g.prod);
    else rows.prod = "none yet";
    side("baseline", g.baseline);
    for (const [k, v] of Object.entries(g)) {
      if (!["promote", "reason", "candidate", "prod", "prod_version", "baseline"].includes(k) && (typeof v !== "object" || v === null)) {
        rows[k === "majority_rate" ? "most common label's rate" : k] = v;
      }
    }
    return rows;
  }

  function drawJob(j) {
    const p = j.progress || {};
    const f = j.status === "succeeded" ? 1 : typeof p.fraction === "number" ? p.fraction : 0;
    const eta = ACTIVE.has(j.status) && typeof p.eta_seconds === "number" ? ` · about ${Math.ceil(p.eta_seconds)} s left` : "";
    replace(title, "Job ", h("span", { class: "mono", text: j.id }), " ", badge(j.status));
    title.dataset.status = j.status;
    replace(status,
      h("p", {}, "Adapter ", h("a", { href: `#/adapters/${enc(j.adapter)}`, text: j.adapter }),
        ` · ${j.task} · ${j.method} · promote ${j.promote}`, j.version ? ` · made v${j.version}` : "",
        j.status === "queued" && j.queue_position ? ` · queue position ${j.queue_position}` : ""),
      h("div", { class: "progress-line", id: "job-progress", dataset: { fraction: String(f) } }, bar(f, "training progress"),
        h("span", { text: typeof p.step === "number" ? `step ${p.step}/${p.total_steps}, epoch ${p.epoch}${eta}` : `${Math.round(f * 100)}%` })),
      j.error ? h("div", { class: "error", role: "alert" }, h("span", { text: `${j.error.code}: ${j.error.message}` })) : null,
      h("p", { class: "muted", text: `created ${fmtTime(j.created_at)}${j.started_at ? ` · started ${fmtTime(j.started_at)}` : ""}${j.finished_at ? ` · finished ${fmtTime(j.finished_at)}` : ""}` }));
    replace(actions, ACTIVE.has(j.status) ? h("button", { type: "button", class: "danger", id: "cancel-job",
      text: j.cancel_requested ? "Cancelling…" : "Cancel job", disabled: j.cancel_requested,
      onclick: async () => {
        showError(err, null);
        try { drawJob(await api("POST", `/v1/jobs/${enc(id)}/cancel`)); } catch (e) { showError(err, e); }
      } }) : null);
    const g = j.result && j.result.gate;
    if (g && typeof g === "object") {
      replace(gate,
        h("p", { class: g.promote ? "gate-yes" : "gate-no", text: g.promote ? "Promoted to prod" : "Not promoted" }),
        h("p", { class: "gate-reason", text: g.reason }),
        kvTable(gateFigures(g)));
    } else {
      replace(gate, h("p", { class: "muted", text: ACTIVE.has(j.status) ? "Decided when training ends." : "No decision (the job did not finish training)." }));
    }
    replace(hp, j.resolved_hyperparameters
      ? [h("p", { class: "muted", text: "As resolved for training:" }), kvTable(j.resolved_hyperparameters)]
      : [h("p", { class: "muted", text: "Submitted (resolved when a worker starts it):" }), kvTable(j.hyperparameters)]);
    replace(dataset, kvTable({ ...j.dataset, training_file: j.training_file, validation_file: j.validation_file,
                               ...Object.fromEntries(Object.entries(j.metrics || {}).filter(([, v]) => typeof v !== "object")) }));
  }

  life.every(async () => {
    let j;
    try {
      j = await api("GET", `/v1/jobs/${enc(id)}`);
      if (!val && life.alive) val = validationChart(valHost, j.task);
      let page;
      do {
        page = await api("GET", `/v1/jobs/${enc(id)}/events`, { query: { after, limit: 1000 } });
        if (!life.alive) return false;
        addEvents(page);
      } while (page.length === 1000);
    } catch (e) {
      if (life.alive) showError(err, e);
      return !(e.status === 404 || e.status === 401);
    }
    showError(err, null);
    drawJob(j);
    return ACTIVE.has(j.status);  // a finished job's events are all read: stop polling
  }, POLL_MS);
  return () => { life.stop(); loss.stop(); if (val) val.stop(); };
}
