// Playground: pick one of the tenant's adapters (and a version or alias), give it inputs of its
// task, and see each prediction with every label's score as a bar (POST /v1/predict).
//
// Inputs are drawn by a panel per task kind (PANELS). A task kind without a panel shows a note,
// never a wrong form. A panel with ownControls (the chat panel of text-generation adapters,
// views/chat.js: POST /v1/chat/completions, streamed) has its own buttons and results: the form's
// submit goes to its send(model), and Predict and Predictions hide.

import { api } from "../api.js";
import { h, replace, bar, errorBox, showError, fmtNum } from "../dom.js";
import { chatPanel } from "./chat.js";

const MAX_LINES = 16;

function textPanel() {
  const area = h("textarea", { id: "playground-text", rows: 5, placeholder: "One text per line" });
  return {
    node: h("div", {}, h("label", { for: "playground-text", text: "Texts (one per line)" }), area),
    request(adapter) {
      const inputs = area.value.split("\n").map((l) => l.trim()).filter(Boolean).slice(0, MAX_LINES);
      if (!inputs.length) return null;
      return { body: { json: { adapter, inputs } }, shown: inputs.map((t) => h("span", { class: "input-text", text: t })) };
    },
  };
}

function imagePanel() {
  const input = h("input", { type: "file", id: "playground-images", accept: "image/*", multiple: true });
  const previews = h("div", { class: "thumbs" });
  let urls = [];
  input.addEventListener("change", () => {
    for (const u of urls) URL.revokeObjectURL(u);
    urls = [...input.files].slice(0, MAX_LINES).map((f) => URL.createObjectURL(f));
    replace(previews, urls.map((u) => h("img", { src: u, alt: "", class: "thumb" })));
  });
  return {
    node: h("div", {}, h("label", { for: "playground-images", text: "Images" }), input, previews),
    request(adapter) {
      const chosen = [...input.files].slice(0, MAX_LINES);
      if (!chosen.length) return null;
      const form = new FormData();
      form.append("adapter", adapter);
      for (const f of chosen) form.append("images", f, f.name);
      return { body: { form }, shown: chosen.map((f, i) => h("span", {}, h("img", { src: urls[i], alt: "", class: "thumb" }), h("span", { class: "input-text", text: f.name }))) };
    },
    stop() { for (const u of urls) URL.revokeObjectURL(u); },
  };
}

const PANELS = { "text-classification": textPanel, "image-classification": imagePanel, "text-generation": chatPanel };

function prediction(shown, p) {
  const scores = Object.entries(p.scores).sort((a, b) => b[1] - a[1]);
  return h("li", { class: "prediction" },
    h("div", { class: "prediction-input" }, shown),
    h("div", { class: "prediction-label" }, "→ ", h("strong", { class: "predicted", text: p.label }), ` ${fmtNum(p.score, 3)}`),
    h("table", { class: "scores" }, h("tbody", {}, scores.map(([label, s]) => h("tr", {},
      h("th", { scope: "row", class: "score-label", text: label }),
      h("td", { class: "score-bar" }, bar(s, label)),
      h("td", { class: "num", text: fmtNum(s, 3) }))))));
}

export function render(main, preselect) {
  let alive = true;
  let panel = null;
  const err = errorBox(null);
  err.id = "predict-error";
  const adapterSel = h("select", { id: "playground-adapter" });
  const versionSel = h("select", { id: "playground-version" });
  const panelHost = h("div", { id: "playground-panel" });
  const results = h("ol", { class: "predictions", id: "predictions" });
  const meta = h("p", { class: "muted", id: "prediction-meta" });
  const go = h("button", { type: "submit", class: "primary", id: "predict", text: "Predict" });
  let adapters = [];

  function choosePanel() {
    if (panel && panel.stop) panel.stop();
    const a = adapters.find((x) => x.name === adapterSel.value);
    replace(versionSel, h("option", { value: "", text: a && a.prod !== null ? `prod (v${a.prod})` : "prod" }),
      a ? [...a.versions].reverse().map((v) => h("option", { value: `@${v}`, text: `v${v}` })) : []);
    const make = a && PANELS[a.task];
    panel = make ? make() : null;
    replace(panelHost, panel ? panel.node
      : h("p", { class: "muted", text: a ? `No playground for ${a.task || "an adapter without versions"} yet.` : "" }));
    go.disabled = !panel;
    go.hidden = Boolean(panel && panel.ownControls);
    resultsCard.hidden = go.hidden;
  }
  adapterSel.addEventListener("change", choosePanel);

  const form = h("form", { class: "card", id: "playground-form", method: "post", action: "" },
    h("h1", { text: "Playground" }),
    h("div", { class: "row" }, h("label", { for: "playground-adapter", text: "Adapter" }), adapterSel,
      h("label", { for: "playground-version", text: "Version" }), versionSel),
    panelHost, go, err);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(err, null);
    if (!panel) return;
    if (panel.ownControls) { panel.send(adapterSel.value + versionSel.value); return; }
    const req = panel.request(adapterSel.value + versionSel.value);
    if (!req) { showError(err, { message: "give at least one input", param: "inputs" }); return; }
    go.disabled = true;
    try {
      const r = await api("POST", "/v1/predict", req.body);
      if (!alive) return;
      replace(meta, `${r.adapter} v${r.version}`);
      replace(results, r.predictions.map((p, i) => prediction(req.shown[i], p)));
    } catch (e2) {
      showError(err, e2);
    } finally {
      go.disabled = false;
    }
  });
  const resultsCard = h("section", { class: "card" }, h("h2", { text: "Predictions" }), meta, results);
  main.append(form, resultsCard);

  api("GET", "/v1/adapters").then((list) => {
    if (!alive) return;
    adapters = list.filter((a) => a.versions.length);
    if (!adapters.length) {
      replace(panelHost, h("p", { class: "empty" }, "No adapters with versions yet: ", h("a", { href: "#/new-job", text: "train one" }), "."));
      go.disabled = true;
      return;
    }
    replace(adapterSel, adapters.map((a) => h("option", { value: a.name, text: `${a.name} (${a.task})`, selected: a.name === preselect })));
    choosePanel();
  }).catch((e) => showError(err, e));
  return () => { alive = false; if (panel && panel.stop) panel.stop(); };
}
