// Learning curves with the vendored uPlot: training loss per step, validation metrics per epoch
// (a classifier's accuracy, macro-F1 and loss; a generator's loss and perplexity, log scale).
//
// lossChart(host) / validationChart(host) return {update(...), stop()}: update takes the samples
// gathered from the job's metrics events so far and returns how many x values it draws; the chart
// keeps its size to its host's width.

import uPlot from "../vendor/uplot-1.6.32/uPlot.esm.js";

const HEIGHT = 240;

function width(host) { return Math.max(280, Math.floor(host.clientWidth || 600)); }

function make(host, opts, data) {
  const plot = new uPlot({ width: width(host), height: HEIGHT, ...opts }, data, host);
  const resize = new ResizeObserver(() => plot.setSize({ width: width(host), height: HEIGHT }));
  resize.observe(host);
  return { plot, stop: () => { resize.disconnect(); plot.destroy(); } };
}

export function lossChart(host) {
  const { plot, stop } = make(host, {
    title: "Training loss",
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss" }],
    series: [{ label: "step" },
             { label: "train loss (sampled steps)", stroke: "#2563eb", width: 2, spanGaps: true },
             { label: "epoch mean", stroke: "#f59e0b", width: 2, spanGaps: true, points: { show: true, size: 6 } }],
  }, [[], [], []]);
  return {
    // steps: [{step, train_loss}] sampled during training; epochs: [{step, train_loss}] at each epoch's end
    update(steps, epochs) {
      const xs = [...new Set([...steps.map((p) => p.step), ...epochs.map((p) => p.step)])].sort((a, b) => a - b);
      const at = (points) => { const m = new Map(points.map((p) => [p.step, p.train_loss])); return xs.map((x) => (m.has(x) ? m.get(x) : null)); };
      plot.setData([xs, at(steps), at(epochs)]);
      return xs.length;
    },
    stop,
  };
}

// task: a job's task; text generation has no accuracy or F1 but a loss and its perplexity.
export function validationChart(host, task) {
  if (task === "text-generation") return generationValidationChart(host);
  const { plot, stop } = make(host, {
    title: "Validation per epoch",
    scales: { x: { time: false }, score: { range: [0, 1] }, loss: {} },
    axes: [{ label: "epoch" }, { scale: "score", label: "accuracy / F1" },
           { scale: "loss", side: 1, label: "val loss", grid: { show: false } }],
    series: [
      { label: "epoch" },
      { label: "val accuracy", scale: "score", stroke: "#16a34a", width: 2, points: { show: true } },
      { label: "val macro-F1", scale: "score", stroke: "#9333ea", width: 2, dash: [6, 4], points: { show: true } },
      { label: "val loss", scale: "loss", stroke: "#dc2626", width: 2, points: { show: true } },
    ],
  }, [[], [], [], []]);
  const num = (x) => (typeof x === "number" ? x : null);
  return {
    update(points) {
      plot.setData([points.map((p) => p.epoch), points.map((p) => num(p.val_accuracy)),
                    points.map((p) => num(p.val_macro_f1)), points.map((p) => num(p.val_loss))]);
    },
    stop,
  };
}

function generationValidationChart(host) {
  const { plot, stop } = make(host, {
    title: "Validation per epoch",
    scales: { x: { time: false }, loss: {}, ppl: { distr: 3, log: 10 } },
    axes: [{ label: "epoch" }, { scale: "loss", label: "val loss" },
           { scale: "ppl", side: 1, label: "val perplexity (log)", grid: { show: false } }],
    series: [
      { label: "epoch" },
      { label: "val loss", scale: "loss", stroke: "#dc2626", width: 2, points: { show: true } },
      { label: "val perplexity", scale: "ppl", stroke: "#0891b2", width: 2, dash: [6, 4], points: { show: true } },
    ],
  }, [[], [], []]);
  const pos = (x) => (typeof x === "number" && x > 0 ? x : null);
  return {
    update(points) {
      plot.setData([points.map((p) => p.epoch), points.map((p) => (typeof p.val_loss === "number" ? p.val_loss : null)),
                    points.map((p) => pos(p.val_perplexity))]);
    },
    stop,
  };
}
