// New job: upload a dataset (with a progress bar) or pick an uploaded one, choose auto or custom
// hyper-parameters, start. The API's validation errors (a bad row: "line 3: ...") are shown
// next to the part of the form they concern, with the field they name.

import { api, ApiError, upload } from "../api.js";
import { h, replace, errorBox, showError, fmtBytes, fmtTime, NAME_RE } from "../dom.js";

const TASKS = [["text-classification", "Text classification (JSONL or CSV of text,label)"],
               ["image-classification", "Image classification (zip of label/<image> folders, or JSONL)"],
               ["text-generation", 'Text generation (JSONL of chats {"messages": [...]} or {"prompt", "completion"})']];
const HP_FIELDS = [["epochs", "int", "1-100"], ["learning_rate", "float", "e.g. 0.001"], ["batch_size", "int", "1-512"],
                   ["lora_r", "int", "LoRA rank"], ["patience", "int", "early-stop epochs"], ["seed", "int", "0+"]];

// what a job of each task may train with (the API refuses the rest: a generation adapter has no head)
const METHODS = { "text-generation": ["lora"] };
const ALL_METHODS = ["lora", "head"];

// generation data has examples (chats or prompt/completion pairs), no labels
function rowsOf(f) { return f.task === "text-generation" ? `${f.rows} examples` : `${f.rows} rows · ${f.labels.length} labels`; }
function fileLabel(f) { return `${f.filename} · ${rowsOf(f)} · ${f.task} · ${fmtTime(f.created_at)}`; }

export function render(main) {
  let alive = true;
  let files = [];
  const task = h("select", { id: "task", name: "task" }, TASKS.map(([v, l]) => h("option", { value: v, text: l })));
  const fileInput = h("input", { type: "file", id: "dataset-file", name: "file" });
  const progress = h("progress", { id: "upload-progress", max: 1, value: 0, hidden: true });
  const progressText = h("span", { id: "upload-progress-text", class: "muted" });
  const uploadErr = errorBox(null);
  uploadErr.id = "upload-error";
  const uploaded = h("div", { id: "upload-result" });
  const trainSel = h("select", { id: "training-file", name: "training_file", required: true });
  const valSel = h("select", { id: "validation-file", name: "validation_file" });

  const adapter = h("input", { id: "adapter-name", name: "adapter", required: true, autocomplete: "off",
                               placeholder: "e.g. sentiment" });
  const method = h("select", { id: "method" }, ALL_METHODS.map((m) => h("option", { value: m, text: m })));
  const promote = h("select", { id: "promote" }, [["auto", "auto: if the gate passes"], ["always", "always"], ["never", "never (promote by hand)"]]
    .map(([v, l]) => h("option", { value: v, text: l })));
  const hpAuto = h("input", { type: "radio", name: "hp-mode", id: "hp-auto", value: "auto", checked: true });
  const hpCustom = h("input", { type: "radio", name: "hp-mode", id: "hp-custom", value: "custom" });
  const hpInputs = Object.fromEntries(HP_FIELDS.map(([k, , hint]) => [k, h("input", { id: `hp-${k}`, name: k, placeholder: `auto (${hint})`, inputmode: "decimal" })]));
  const hpExtra = h("textarea", { id: "hp-extra", rows: 2, placeholder: '{"target_modules": ["query", "value"]}' });
  const hpBox = h("fieldset", { class: "hp-custom", hidden: true }, h("legend", { text: "Custom values (empty = auto)" }),
    HP_FIELDS.map(([k]) => h("label", { class: "inline" }, h("span", { text: k }), hpInputs[k])),
    h("label", {}, h("span", { text: "other (a JSON object)" }), hpExtra));
  for (const r of [hpAuto, hpCustom]) r.addEventListener("change", () => { hpBox.hidden = !hpCustom.checked; });
  const jobErr = errorBox(null);
  jobErr.id = "job-error";
  const submit = h("button", { type: "submit", class: "primary", id: "start-job", text: "Start training" });

  function fillFiles(selectedId) {
    const opts = (sel, empty) => replace(sel, h("option", { value: "", text: empty }),
      files.map((f) => h("option", { value: f.id, text: fileLabel(f), selected: f.id === selectedId && sel === trainSel })));
    opts(trainSel, files.length ? "choose an uploaded file" : "upload a file first");
    opts(valSel, "none: hold out part of the training data");
    fillMethods();
  }

  function fillMethods() {  // the methods the chosen training file's task supports
    const f = files.find((x) => x.id === trainSel.value);
    const keep = method.value;
    replace(method, (METHODS[f && f.task] || ALL_METHODS).map((m) => h("option", { value: m, text: m, selected: m === keep })));
  }
  trainSel.addEventListener("change", fillMethods);

  async function loadFiles(selectedId) {
    const list = await api("GET", "/v1/files");
    if (!alive) return;
    files = list;
    fillFiles(selectedId);
  }

  const uploadForm = h("form", { class: "card", id: "upload-form", method: "post", action: "" },
    h("h2", { text: "1. Data" }),
    h("label", { for: "task", text: "Task" }), task,
    h("label", { for: "dataset-file", text: "Data file" }), fileInput,
    h("div", { class: "row" }, h("button", { type: "submit", id: "upload", text: "Upload" }), progress, progressText),
    uploadErr, uploaded);
  uploadForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = fileInput.files && fileInput.files[0];
    showError(uploadErr, null);
    replace(uploaded);
    if (!file) { showError(uploadErr, new ApiError(0, "invalid_request", "choose a file to upload", "file")); return; }
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("task", task.value);
    progress.hidden = false;
    progress.value = 0;
    progressText.textContent = `0 / ${fmtBytes(file.size)}`;
    try {
      const f = await upload("/v1/files", form, (loaded, total) => {
        progress.value = total ? loaded / total : 0;
        progressText.textContent = `${fmtBytes(loaded)} / ${fmtBytes(total || file.size)}`;
      });
      progress.value = 1;
      progressText.textContent = `uploaded ${fmtBytes(f.bytes)}`;
      replace(uploaded, h("p", { class: "ok", id: "uploaded-file", dataset: { fileId: f.id } },
        h("span", { class: "mono", text: f.id }), " ", h("span", { text: f.filename }),
        f.task === "text-generation" ? ` · ${f.rows} examples`
          : [` · ${f.rows} rows · labels: `, h("span", { class: "labels", text: f.labels.join(", ") })],
        f.duplicates_dropped ? ` · ${f.duplicates_dropped} duplicates dropped` : ""));
      await loadFiles(f.id);
    } catch (e2) {
      progress.hidden = true;
      progressText.textContent = "";
      showError(uploadErr, e2);
    }
  });

  function hyperparameters() {
    if (!hpCustom.checked) return {};
    const out = {};
    for (const [k, type] of HP_FIELDS) {
      const raw = hpInputs[k].value.trim();
      if (!raw) continue;
      const n = Number(raw);
      if (!Number.isFinite(n) || (type === "int" && !Number.isInteger(n))) {
        throw new ApiError(0, "invalid_request", `${k} must be ${type === "int" ? "an integer" : "a number"}`, `hyperparameters.${k}`);
      }
      out[k] = n;
    }
    const extra = hpExtra.value.trim();
    if (extra) {
      let obj;
      try { obj = JSON.parse(extra); } catch { obj = null; }
      if (!obj || typeof obj !== "object" || Array.isArray(obj)) throw new ApiError(0, "invalid_request", "other hyper-parameters: not a JSON object", "hyperparameters");
      Object.assign(out, obj);
    }
    return out;
  }

  const jobForm = h("form", { class: "card", id: "job-form", method: "post", action: "" },
    h("h2", { text: "2. Job" }),
    h("label", { for: "adapter-name", text: "Adapter (a new name, or an existing one for its next version)" }), adapter,
    h("label", { for: "training-file", text: "Training file" }), trainSel,
    h("label", { for: "validation-file", text: "Validation file" }), valSel,
    h("div", { class: "row" }, h("label", { for: "method", text: "Method" }), method, h("label", { for: "promote", text: "Promote" }), promote),
    h("fieldset", { class: "hp-mode" }, h("legend", { text: "Hyper-parameters" }),
      h("label", { class: "inline" }, hpAuto, h("span", { text: "auto (chosen from the data)" })),
      h("label", { class: "inline" }, hpCustom, h("span", { text: "custom" }))),
    hpBox, submit, jobErr);
  jobForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(jobErr, null);
    try {
      const name = adapter.value.trim();
      if (!NAME_RE.test(name)) throw new ApiError(0, "invalid_name", "1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit", "adapter");
      if (!trainSel.value) throw new ApiError(0, "invalid_request", "choose a training file (upload one above)", "training_file");
      const body = { adapter: name, training_file: trainSel.value, method: method.value, promote: promote.value,
                     hyperparameters: hyperparameters() };
      if (valSel.value) body.validation_file = valSel.value;
      submit.disabled = true;
      const job = await api("POST", "/v1/jobs", { json: body });
      window.location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e2) {
      submit.disabled = false;
      showError(jobErr, e2);
    }
  });

  main.append(h("h1", { text: "New job" }), h("div", { class: "columns two" }, uploadForm, jobForm));
  loadFiles(null).catch((e) => showError(jobErr, e));
  return () => { alive = false; };
}
