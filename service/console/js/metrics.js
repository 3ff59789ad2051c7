// Reads the service's own Prometheus text (/metrics) into the numbers the operator view shows.
//
// parse(text) -> [{name, labels, value}] for every sample line (comments skipped); summary(samples)
// -> {ready, tasks: {task: {resident, residentBytes, hits, misses, hitRate, batches, meanBatch,
// meanAdapters}}, jobs: {status: n}}. Unknown lines are ignored, never an error.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

export function parse(text) {
  const out = [];
  for (const raw of String(text).split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(LABEL)) labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    const value = Number(m[3]);
    if (!Number.isNaN(value)) out.push({ name: m[1], labels, value });
  }
  return out;
}

function byTask(samples, name) {
  const out = {};
  for (const s of samples) if (s.name === name) out[s.labels.task || ""] = (out[s.labels.task || ""] || 0) + s.value;
  return out;
}

export function summary(samples) {
  const ready = samples.find((s) => s.name === "tailor_ready");
  const series = {
    resident: byTask(samples, "tailor_adapters_resident"),
    residentBytes: byTask(samples, "tailor_adapters_resident_bytes"),
    hits: byTask(samples, "tailor_adapter_cache_hits_total"),
    misses: byTask(samples, "tailor_adapter_cache_misses_total"),
    batches: byTask(samples, "tailor_batch_size_count"),
    batchRows: byTask(samples, "tailor_batch_size_sum"),
    adapterSum: byTask(samples, "tailor_batch_adapters_sum"),
    predicted: byTask(samples, "tailor_predict_rows_total"),
  };
  const tasks = {};
  for (const values of Object.values(series)) for (const t of Object.keys(values)) if (t) tasks[t] = {};
  for (const t of Object.keys(tasks)) {
    const hits = series.hits[t] || 0;
    const misses = series.misses[t] || 0;
    const batches = series.batches[t] || 0;
    tasks[t] = {
      resident: series.resident[t] || 0,
      residentBytes: series.residentBytes[t] || 0,
      hits, misses,
      hitRate: hits + misses > 0 ? hits / (hits + misses) : null,
      batches,
      meanBatch: batches > 0 ? (series.batchRows[t] || 0) / batches : null,
      meanAdapters: batches > 0 ? (series.adapterSum[t] || 0) / batches : null,
      rows: series.predicted[t] || 0,
    };
  }
  const jobs = {};
  for (const s of samples) if (s.name === "tailor_jobs" && s.labels.status) jobs[s.labels.status] = s.value;
  return { ready: ready ? ready.value === 1 : null, tasks, jobs };
}
