// The page of `toolkit view`: hand-written SVG over the JSON data in #view-data; no library, no
// network. Layout: the shift over training (run), the comparison, the attention on a text.
"use strict";

const D = JSON.parse(document.getElementById("view-data").textContent);
const ROLES = ["wq", "wk", "wv", "w0"];
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"];
// magma, 9 stops: dark = small, light = large
const MAGMA = [[0, 0, 4], [28, 16, 68], [79, 18, 123], [129, 37, 129], [181, 54, 122],
  [229, 80, 100], [251, 135, 97], [254, 194, 135], [252, 253, 191]];
const CELL = 16;

const state = { step: 0, layer: 0, head: 0, text: 0, token: 0, mode: "matrix" };
const listeners = { step: [], head: [] };

// ---------------------------------------------------------------------------------------------
// Small helpers

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of [].concat(children)) {
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function svgEl(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function fmt(x) {
  if (x === null || x === undefined) return "n/a";
  if (Number.isInteger(x) && Math.abs(x) < 1e6) return String(x);
  return Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3 ? x.toExponential(3) : x.toPrecision(4);
}

function colour(t) {
  t = Math.max(0, Math.min(1, Number.isFinite(t) ? t : 0)) * (MAGMA.length - 1);
  const i = Math.min(Math.floor(t), MAGMA.length - 2);
  const f = t - i;
  const c = MAGMA[i].map((v, k) => Math.round(v + f * (MAGMA[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

const tooltip = document.getElementById("tooltip");
function showTip(event, text) {
  tooltip.textContent = text;
  tooltip.hidden = false;
  tooltip.style.left = `${event.clientX + 14}px`;
  tooltip.style.top = `${event.clientY + 12}px`;
}
function hideTip() { tooltip.hidden = true; }

function select(id, options, value, onChange) {
  const node = el("select", { id });
  options.forEach(([optionValue, label]) => {
    const option = el("option", { value: String(optionValue) }, label);
    if (String(optionValue) === String(value)) option.selected = true;
    node.append(option);
  });
  node.addEventListener("change", () => onChange(node.value));
  return node;
}

function range(n) { return Array.from({ length: n }, (_, i) => i); }

// [min, max] of the defined values (a loop: spreading a long run's values into Math.max would
// pass more arguments than a call may take)
function extent(values) {
  let low = Infinity, high = -Infinity;
  for (const v of values) {
    if (v === null) continue;
    if (v < low) low = v;
    if (v > high) high = v;
  }
  return [low, high];
}

function pickHead(layer, head) {
  state.layer = layer;
  state.head = head;
  listeners.head.forEach((f) => f());
}

// ---------------------------------------------------------------------------------------------
// Whether the values in [min, max] differ by no more than float rounding: they are ratios to the
// weights' own size (cosines, relative changes), so a spread below `floor` (D.noise_floor, set in
// toolkit/render/scales.py) of the larger of 1 and their size is noise, not change.
function withinNoise(min, max, floor) {
  return max - min <= floor * Math.max(1, Math.abs(min), Math.abs(max));
}

// The fill of value v on the scale [min, max]; when the scale spans only float noise, one flat
// colour: that of the end which means "no change" (max for cosines, min for relative changes).
function scaleColour(v, min, max, restAtMax, floor) {
  if (withinNoise(min, max, floor)) return colour(restAtMax ? 1 : 0);
  return colour((v - min) / (max - min));
}

// A layer x head heatmap. value(layer, head) -> number | null; scale [min, max], whose max means
// no change when restAtMax (cosines), else its min.

// layerIds: the model's index of each row (a comparison may hold only some layers).
// group: query heads per column (wk, wv of grouped- or multi-query attention: a column is a
// key/value head, shared by `group` query heads; a click picks the first of them).
function heatmap({ name, title, layers, heads, value, min = 0, max, restAtMax = false,
  describe,
  layerIds = range(layers), group = 1 }) {
  const left = 22, top = 16;
  const width = Math.max(left + heads * CELL + 4, 90), height = top + layers * CELL + 14;
  const svg = svgEl("svg", { width, height, class: "heatmap", "data-map": name });
  svg.append(svgEl("text", { x: left, y: 11 }, title));
  const cells = [];
  for (const layer of range(layers)) {
    svg.append(svgEl("text", { x: left - 4, y: top + layer * CELL + 12, "text-anchor": "end" },
      String(layerIds[layer])));
    for (const head of range(heads)) {
      const rect = svgEl("rect", {
        class: "cell", x: left + head * CELL, y: top + layer * CELL,
        width: CELL - 1, height: CELL - 1, "data-layer": layer, "data-head": head,
      });
      rect.addEventListener("mousemove", (event) => showTip(event, describe(layer, head)));
      rect.addEventListener("mouseleave", hideTip);
      rect.addEventListener("click", () => pickHead(layerIds[layer], head * group));
      svg.append(rect);
      cells.push(rect);
    }
  }
  svg.append(svgEl("text", { x: left, y: height - 2 }, "head →"));
  function update() {
    for (const rect of cells) {
      const v = value(+rect.dataset.layer, +rect.dataset.head);
      rect.setAttribute("data-value", v === null ? "" : String(v));
      rect.setAttribute("fill", v === null ? "#ccc" : scaleColour(v, min, max, restAtMax, D.noise_floor));
      rect.classList.toggle("picked",
        layerIds[+rect.dataset.layer] === state.layer &&
        +rect.dataset.head === Math.floor(state.head / group));
    }
  }
  update();
  listeners.head.push(update);
  return { svg, update };
}

function scaleLegend(min, max, label, restAtMax = false) {
  const svg = svgEl("svg", { width: 170, height: 44, class: "scale-legend" });
  svg.append(svgEl("text", { x: 10, y: 12 }, label));
  const flat = withinNoise(min, max, D.noise_floor);
  range(60).forEach((i) => svg.append(svgEl("rect", {
    x: 10 + i * 2.5, y: 18, width: 2.6, height: 10,
    fill: flat ? scaleColour(min, min, max, restAtMax, D.noise_floor) : colour(i / 59),
  })));
  if (flat) {
    svg.append(svgEl("text", { x: 10, y: 40 }, `no change (all ${fmt(restAtMax ? max : min)} ± float noise)`));
  } else {
    svg.append(svgEl("text", { x: 10, y: 40 }, fmt(min)));
    svg.append(svgEl("text", { x: 160, y: 40, "text-anchor": "end" }, fmt(max)));
  }
  return svg;
}

// ---------------------------------------------------------------------------------------------
// A line chart: series [{name, points: [[x, y]], dots}], optional log y; returns {svg, mark(x)}.

function lineChart({ title, series, width = 380, height = 200, logY = false, xLabel = "" }) {
  const pad = { left: 48, right: 10, top: 18, bottom: 30 };
  const svg = svgEl("svg", { width, height, class: "chart" });
  svg.append(svgEl("text", { x: pad.left, y: 12 }, title));
  const points = series.flatMap((s) => s.points).filter((p) => p[1] !== null && (!logY || p[1] > 0));
  if (!points.length) {
    svg.append(svgEl("text", { x: pad.left, y: height / 2 }, "no values"));
    return { svg, mark() {} };
  }
  const ty = (y) => (logY ? Math.log10(y) : y);
  let [x0, x1] = extent(points.map((p) => p[0]));
  let [y0, y1] = extent(points.map((p) => ty(p[1])));
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((ty(y) - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  svg.append(svgEl("line", { class: "axis", x1: pad.left, x2: width - pad.right,
    y1: height - pad.bottom, y2: height - pad.bottom }));
  svg.append(svgEl("line", { class: "axis", x1: pad.left, x2: pad.left, y1: pad.top,
    y2: height - pad.bottom }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    const label = logY ? fmt(10 ** y) : fmt(y);
    const yy = height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
    svg.append(svgEl("text", { x: pad.left - 4, y: yy + 3, "text-anchor": "end" }, label));
  }
  svg.append(svgEl("text", { x: pad.left, y: height - 16 }, fmt(x0)));
  svg.append(svgEl("text", { x: width - pad.right, y: height - 16, "text-anchor": "end" }, fmt(x1)));
  svg.append(svgEl("text", { x: (pad.left + width) / 2, y: height - 4, "text-anchor": "middle" },
    xLabel));
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const valid = s.points.filter((p) => p[1] !== null && (!logY || p[1] > 0));
    if (valid.length > 1) {
      svg.append(svgEl("polyline", { fill: "none", stroke: color, "stroke-width": 1.3,
        points: valid.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }));
    }
    if (s.dots || valid.length === 1) {
      valid.forEach((p) => svg.append(svgEl("circle",
        { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color })));
    }
  });
  const legend = el("div", { class: "legend muted" });
  series.forEach((s, i) => {
    legend.append(el("span", { style: `background:${s.color || COLORS[i % COLORS.length]}` }));
    legend.append(s.name);
  });
  const marker = svgEl("line", { class: "marker", y1: pad.top, y2: height - pad.bottom,
    visibility: "hidden" });
  svg.append(marker);
  const box = el("div", { class: "panel" }, [svg, legend]);
  return {
    svg: box,
    mark(x) {
      marker.setAttribute("x1", sx(x));
      marker.setAttribute("x2", sx(x));
      marker.setAttribute("visibility", "visible");
      marker.setAttribute("data-step", String(x));
    },
  };
}

function table(id, header, rows) {
  const node = el("table", { id });
  node.append(el("tr", {}, header.map((h) => el("th", {}, h))));
  rows.forEach((row) => node.append(el("tr", {}, row.map((c) => el("td", {},
    typeof c === "number" ? fmt(c) : String(c))))));
  return node;
}

// ---------------------------------------------------------------------------------------------
// Query heads per stored head of a weight: 1 for wq and w0, h / h_kv for wk and wv.
function groupOf(storedHeads, queryHeads) { return queryHeads / storedHeads; }
function headLabel(group) { return group > 1 ? "key/value head" : "head"; }

// The run: heatmaps with a step slider, curves, heads that moved most

function runSection(run) {
  const section = el("section", { id: "run" }, [el("h2", {}, "How the attention weights moved")]);
  main.append(section);
  if (!run.steps.length) {
    section.append(el("p", { class: "note" }, "Shift tracking was off in this run (--track-every 0)."));
    section.append(curves(run).row);
    if (run.baselines) section.append(baselineTable(run));
    return;
  }
  section.append(el("p", { class: "muted" },
    "Relative change of each head against step 0: ||W_t[h] - W_0[h]||_F / ||W_0[h]||_F; " +
    "'all four' is wq, wk, wv, w0 of the head taken together. Rows are layers, columns heads. " +
    "Hover a cell for its numbers, " +
    "click it to see that head's attention below."));
  const maps = [...ROLES, "all"];
  const change = run.head_change;
  // a weight's own entry for query head h (wk, wv: its key/value head's)
  const groups = Object.fromEntries(maps.map((m) =>
    [m, groupOf(change[m][0][0].length, run.n_heads)]));
  const ofHead = (m, step, l, h) => change[m][step][l][Math.floor(h / groups[m])];
  const max = extent(maps.flatMap((m) => change[m].flat(2)))[1];
  const slider = el("input", { id: "step-slider", type: "range", min: 0,
    max: run.steps.length - 1, value: 0, step: 1 });
  const stepLabel = el("span", { id: "step-label" });
  const play = el("button", { id: "play", type: "button" }, "Play");
  section.append(el("div", { class: "controls" }, [play, el("label", {}, ["step ", slider]),
    stepLabel]));
  const row = el("div", { class: "row" });
  section.append(row);
  for (const m of maps) {
    const title = m === "all" ? "all four" : m;
    const map = heatmap({
      name: `run-${m}`, title, layers: run.n_layers, heads: run.n_heads / groups[m], max,
      group: groups[m],
      value: (l, h) => change[m][state.step][l][h],
      describe: (l, h) => `${title} · layer ${l} · ${headLabel(groups[m])} ${h}\nrelative change ` +
        `${fmt(change[m][state.step][l][h])}\nstep ${run.steps[state.step]}`,
    });
    listeners.step.push(map.update);
    row.append(map.svg);
  }
  row.append(scaleLegend(0, max, "relative change"));
  const info = el("div", { id: "head-info" });
  section.append(info);
  const describeHead = () => {
    info.textContent = `layer ${state.layer}, head ${state.head} at step ${run.steps[state.step]}: ` +
      maps.map((m) => `${m === "all" ? "all four" : m} ${fmt(ofHead(m, state.step, state.layer, state.head))}`)
        .join(", ");
  };
  listeners.head.push(describeHead);
  listeners.step.push(describeHead);

  const { row: curvesRow, mark } = curves(run);
  section.append(curvesRow);
  if (run.baselines) section.append(baselineTable(run));
  const top = el("div", { class: "panel" });
  curvesRow.append(top);
  listeners.step.push(() => {
    mark(run.steps[state.step]);
    const ranked = [];
    range(run.n_layers).forEach((l) => range(run.n_heads).forEach((h) =>
      ranked.push([change.all[state.step][l][h], l, h])));
    ranked.sort((a, b) => b[0] - a[0]);
    top.replaceChildren(el("h3", {}, `Heads that moved most at step ${run.steps[state.step]}`),
      table("top-heads", ["layer", "head", "all four", ...ROLES], ranked.slice(0, 8).map(
        ([v, l, h]) => [l, h, v, ...ROLES.map((r) => ofHead(r, state.step, l, h))])));
  });

  function setStep(index) {
    state.step = index;
    slider.value = String(index);
    stepLabel.textContent = `${run.steps[index]} (snapshot ${index + 1} of ${run.steps.length})`;
    listeners.step.forEach((f) => f());
  }
  slider.addEventListener("input", () => setStep(+slider.value));
  let timer = null;
  play.addEventListener("click", () => {
    if (timer !== null) {
      clearInterval(timer); timer = null; play.textContent = "Play"; return;
    }
    if (state.step === run.steps.length - 1) setStep(0);
    play.textContent = "Pause";
    timer = setInterval(() => {
      if (state.step >= run.steps.length - 1) {
        clearInterval(timer); timer = null; play.textContent = "Play"; return;
      }
      setStep(state.step + 1);
    }, 700);
  });
  setStep(run.steps.length - 1);
}

// The final model's validation accuracy and macro-F1 beside the majority class and the bag of
// words (TF-IDF + logistic regression) on the same rows.
function baselineTable(run) {
  const last = run.evaluations[run.evaluations.length - 1];
  const rows = [
    ["always the most common training class", run.baselines.majority],
    ["bag of words (TF-IDF 1-2-grams + logistic regression)", run.baselines.bag_of_words],
    ["fine-tuned model", last],
  ];
  return table("baselines", ["on the validation rows", "accuracy", "macro-F1"],
    rows.map(([name, scores]) => [name, scores.accuracy, scores.f1]));
}

// The loss and metric curves of a run; mark(step) draws the current step on both.
function curves(run) {
  const losses = lineChart({ title: "loss", xLabel: "step", series: [
    { name: "training loss", points: run.train_loss },
    { name: "validation loss", dots: true, points: run.evaluations.map((e) => [e.step, e.eval_loss]) },
  ] });
  const metricNames = [...new Set(run.evaluations.flatMap((e) => Object.keys(e)))]
    .filter((k) => k !== "step" && k !== "eval_loss");
  const metrics = lineChart({ title: "validation metrics", xLabel: "step",
    series: metricNames.map((name) => ({ name, dots: true,
      points: run.evaluations.filter((e) => name in e).map((e) => [e.step, e[name]]) })) });
  return {
    row: el("div", { class: "row" }, [losses.svg, metrics.svg]),
    mark(step) { losses.mark(step); metrics.mark(step); },
  };
}

// ---------------------------------------------------------------------------------------------
// The comparison: elementwise heatmaps, spectra and ranks, circuits; or structural side by side

function comparisonSection(c) {
  const section = el("section", { id: "comparison" }, [el("h2", {},
    `Comparison: ${c.a.name} → ${c.b.name} (${c.mode})`)]);
  main.append(section);
  if (c.note) section.append(el("p", { class: "note" }, c.note));
  if (c.mode === "elementwise") elementwise(section, c); else structural(section, c);
}

function elementwise(section, c) {
  const layers = c.layers.length, heads = c.a.n_heads;
  // wk, wv of grouped- or multi-query attention: one column per key/value head
  const group = (role) => groupOf(c.layers[0].matrices[role].heads.length, heads);
  const headValue = (role, key) => (l, h) => c.layers[l].matrices[role].heads[h][key];
  const relative = Object.fromEntries(ROLES.map((r) => [r, headValue(r, "relative_change")]));
  relative.all = (l, h) => c.head_relative_change[l][h];
  const layerIds = c.layers.map((layer) => layer.layer);
  const describe = (title, value, g = 1) => (l, h) =>
    `${title} · layer ${layerIds[l]} · ${headLabel(g)} ${h}\n${fmt(value(l, h))}`;
  // query heads per column of map m (a weight's own heads; "all" and circuits: query heads)
  const columns = (m) => (ROLES.includes(m) ? group(m) : 1);
  const all = (entries) => entries.flatMap(([m, f]) => range(layers).flatMap((l) =>
    range(heads / columns(m)).map((h) => f(l, h))));
  const maxOf = (entries) => extent(all(entries))[1];

  section.append(el("h3", {}, "Relative change ||W_b[h] - W_a[h]|| / ||W_a[h]|| per head"));
  const max = maxOf(Object.entries(relative));
  const row = el("div", { class: "row" });
  for (const m of [...ROLES, "all"]) {
    const title = m === "all" ? "all four" : m;
    const g = columns(m);
    row.append(heatmap({ name: `compare-${m}`, title, layers, heads: heads / g, group: g, max,
      value: relative[m], layerIds, describe: describe(`${title} relative change`, relative[m], g) }).svg);
  }
  row.append(scaleLegend(0, max, "relative change"));
  section.append(row);

  section.append(el("h3", {}, "Cosine of W_a[h] and W_b[h]"));
  const cosine = Object.fromEntries(ROLES.map((r) => [r, headValue(r, "cosine")]));
  const minCosine = extent(all(Object.entries(cosine)))[0];
  const cosRow = el("div", { class: "row" });
  for (const r of ROLES) {
    cosRow.append(heatmap({ name: `cosine-${r}`, title: r, layers, heads: heads / group(r),
      group: group(r), min: minCosine, max: 1, restAtMax: true, layerIds,
      value: cosine[r], describe: describe(`${r} cosine`, cosine[r], group(r)) }).svg);
  }
  cosRow.append(scaleLegend(minCosine, 1, "cosine", true));
  section.append(cosRow);

  section.append(el("h3", {}, "Circuit change: QK = wq[h] wk[h]^T, OV = wv[h] w0[h]"));
  const circuit = (name) => (l, h) => c.layers[l].circuits[name][h].relative_change;
  const circuitMax = maxOf([["qk", circuit("qk")], ["ov", circuit("ov")]]);
  const circuitRow = el("div", { class: "row" });
  for (const name of ["qk", "ov"]) {
    circuitRow.append(heatmap({ name: `circuit-${name}`, title: `${name.toUpperCase()} relative change`,
      layers, heads, max: circuitMax, value: circuit(name), layerIds,
      describe: describe(`${name.toUpperCase()} relative change`, circuit(name)) }).svg);
  }
  circuitRow.append(scaleLegend(0, circuitMax, "relative change"));
  section.append(circuitRow);

  section.append(el("h3", {}, "Spectrum of ΔW = W_b - W_a per layer, and its ranks"));
  const spectra = el("div", { class: "row" });
  section.append(spectra);
  const drawSpectra = (role) => {
    const chart = lineChart({ title: `singular values of Δ${role}`, logY: true, width: 420,
      height: 230, xLabel: "index", series: c.layers.map((layer) => ({
        name: `layer ${layer.layer}`,
        points: layer.matrices[role].delta_singular_values.map((s, i) => [i + 1, s]) })) });
    spectra.replaceChildren(el("div", {}, [
      select("spectrum-role", ROLES.map((r) => [r, r]), role, drawSpectra), chart.svg]),
    table("ranks", ["layer", "matrix", "rel. change", "cosine", "stable rank Δ",
      "effective rank Δ", `top-${c.top_k} energy Δ`],
    c.layers.flatMap((layer) => ROLES.map((r) => {
      const m = layer.matrices[r];
      return [layer.layer, r, m.relative_change, m.cosine, m.stable_rank_delta,
        m.effective_rank_delta, m.top_k_energy_delta];
    }))));
  };
  drawSpectra("wq");
}

function structural(section, c) {
  section.append(el("h3", {}, "Normalised spectra (s_i / rms(s)), layers at matched relative depth"));
  const charts = el("div", { class: "row" });
  section.append(charts);
  const draw = (role) => {
    charts.replaceChildren(select("spectrum-role", ROLES.map((r) => [r, r]), role, draw));
    c.pairs.forEach((pair) => {
      const series = [["a", pair.a], ["b", pair.b]].map(([side, profile], i) => {
        const s = profile.matrices[role].spectrum;
        return { name: `${side}: ${c[side].name} layer ${profile.layer}`, color: COLORS[i],
          points: s.map((v, k) => [s.length > 1 ? k / (s.length - 1) : 0, v]) };
      });
      charts.append(lineChart({ title: `${role}: layer ${pair.a.layer} / ${pair.b.layer}`,
        series, logY: true, width: 300, height: 190, xLabel: "relative index" }).svg);
    });
  };
  draw("wq");
  section.append(el("h3", {}, "Ranks and norms"));
  section.append(table("ranks", ["layer a", "layer b", "matrix", "stable rank a", "stable rank b",
    "eff. rank share a", "eff. rank share b", "head-norm spread a", "head-norm spread b"],
  c.pairs.flatMap((pair) => ROLES.map((r) => {
    const a = pair.a.matrices[r], b = pair.b.matrices[r];
    return [pair.a.layer, pair.b.layer, r, a.stable_rank, b.stable_rank,
      a.effective_rank / a.spectrum.length, b.effective_rank / b.spectrum.length,
      a.head_fro_spread, b.head_fro_spread];
  }))));
  const mean = (xs) => xs.reduce((s, x) => s + x, 0) / xs.length;
  section.append(el("h3", {}, "QK and OV circuits: mean over heads"));
  section.append(table("circuits", ["layer a", "layer b", "circuit", "stable rank a",
    "stable rank b", "norm a", "norm b"],
  c.pairs.flatMap((pair) => ["qk", "ov"].map((name) => {
    const a = pair.a.circuits[name], b = pair.b.circuits[name];
    return [pair.a.layer, pair.b.layer, name.toUpperCase(), mean(a.head_stable_rank),
      mean(b.head_stable_rank), mean(a.head_fro), mean(b.head_fro)];
  }))));
}

// ---------------------------------------------------------------------------------------------
// Attention on a text: base and fine-tuned side by side, as a matrix or token-to-token lines

function attentionSection(att) {
  const section = el("section", { id: "attention" }, [el("h2", {}, "Attention on a text")]);
  main.append(section);
  section.append(el("p", { class: "muted" },
    "softmax(q k^T / sqrt(d_head)) of one head, computed ahead by the real models on these " +
    "texts (toolkit view --text adds others). Pick the head by clicking a heatmap cell or " +
    "below; click a token to show its softmax row."));
  const sides = [att.a, att.b];
  const sizes = sides.map((s) => (s.maps ? [s.maps[0].probs.length, s.maps[0].probs[0].length]
    : [0, 0]));
  const layers = Math.max(...sizes.map((s) => s[0])), heads = Math.max(...sizes.map((s) => s[1]));
  const controls = el("div", { class: "controls" });
  const panels = el("div", { class: "row", id: "attention-panels" });
  section.append(controls, panels);
  const draw = () => {
    controls.replaceChildren(
      el("label", {}, ["text ", select("text-select", att.texts.map((t, i) => [i, t]), state.text,
        (v) => { state.text = +v; state.token = 0; draw(); })]),
      el("label", {}, ["layer ", select("layer-select", range(layers).map((l) => [l, l]),
        state.layer, (v) => pickHead(+v, state.head))]),
      el("label", {}, ["head ", select("head-select", range(heads).map((h) => [h, h]),
        state.head, (v) => pickHead(state.layer, +v))]),
      el("label", {}, ["show ", select("mode-select", [["matrix", "matrix"],
        ["lines", "token-to-token lines"]], state.mode, (v) => { state.mode = v; draw(); })]),
    );
    panels.replaceChildren(...sides.map((side, i) => attentionPanel(side, i)));
  };
  listeners.head.push(draw);
  draw();
}

function attentionPanel(side, index) {
  const panel = el("div", { class: "panel attention-panel", "data-side": index === 0 ? "a" : "b" },
    [el("h3", {}, side.label)]);
  if (!side.maps) {
    panel.append(el("p", { class: "note" }, `Attention unavailable: ${side.unavailable}`));
    return panel;
  }
  const map = side.maps[state.text];
  if (state.layer >= map.probs.length || state.head >= map.probs[0].length) {
    panel.append(el("p", { class: "note" }, `This model has no layer ${state.layer}, head ${state.head}.`));
    return panel;
  }
  const probs = map.probs[state.layer][state.head];  // [query][key]
  const tokens = map.tokens;
  const token = Math.min(state.token, tokens.length - 1);
  panel.append(el("div", { class: "muted" }, `layer ${state.layer}, head ${state.head}`));
  panel.append(state.mode === "matrix" ? attentionMatrix(tokens, probs, token)
    : attentionLines(tokens, probs, token));
  panel.append(softmaxRow(tokens, probs[token], token));
  return panel;
}

function pickToken(i) {
  state.token = i;
  listeners.head.forEach((f) => f());
}

function attentionMatrix(tokens, probs, picked) {
  const n = tokens.length, cell = Math.max(8, Math.min(22, Math.floor(300 / n)));
  const left = 80, top = 70;
  const svg = svgEl("svg", { width: left + n * cell + 8, height: top + n * cell + 8,
    class: "attention-matrix" });
  tokens.forEach((t, i) => {
    const row = svgEl("text", { x: left - 4, y: top + i * cell + cell * 0.7, "text-anchor": "end",
      class: `token${i === picked ? " picked" : ""}`, "data-token": i }, t);
    row.addEventListener("click", () => pickToken(i));
    svg.append(row);
    const x = left + i * cell + cell * 0.7;
    svg.append(svgEl("text", { x, y: top - 4, transform: `rotate(-60 ${x} ${top - 4})` }, t));
  });
  probs.forEach((row, q) => row.forEach((p, k) => {
    const rect = svgEl("rect", { x: left + k * cell, y: top + q * cell, width: cell - 1,
      height: cell - 1, fill: colour(p), "data-value": String(p) });
    rect.addEventListener("mousemove", (event) =>
      showTip(event, `${tokens[q]} → ${tokens[k]}\nattention ${fmt(p)}`));
    rect.addEventListener("mouseleave", hideTip);
    rect.addEventListener("click", () => pickToken(q));
    svg.append(rect);
  }));
  svg.append(svgEl("text", { x: 2, y: 12 }, "query ↓  key →"));
  return svg;
}

function attentionLines(tokens, probs, picked) {
  const n = tokens.length, gap = 18, width = 300, top = 16;
  const svg = svgEl("svg", { width, height: top + n * gap + 8, class: "attention-lines" });
  probs.forEach((row, q) => row.forEach((p, k) => {
    const strong = q === picked;
    svg.append(svgEl("line", { x1: 110, x2: 190, y1: top + q * gap, y2: top + k * gap,
      stroke: strong ? "#d62728" : "#1f77b4", "stroke-width": strong ? 3 * p + 0.3 : 2 * p,
      "stroke-opacity": strong ? Math.min(1, 0.15 + p) : 0.4 * p }));
  }));
  tokens.forEach((t, i) => {
    for (const [x, anchor] of [[104, "end"], [196, "start"]]) {
      const label = svgEl("text", { x, y: top + i * gap + 4, "text-anchor": anchor,
        class: `token${i === picked && anchor === "end" ? " picked" : ""}`, "data-token": i }, t);
      label.addEventListener("click", () => pickToken(i));
      svg.append(label);
    }
  });
  return svg;
}

function softmaxRow(tokens, row, picked) {
  const width = 300, barHeight = 14, left = 80;
  const svg = svgEl("svg", { width, height: 20 + tokens.length * barHeight, class: "softmax-row" });
  svg.append(svgEl("text", { x: 2, y: 12 }, `softmax row of "${tokens[picked]}" (query ${picked})`));
  row.forEach((p, k) => {
    const y = 18 + k * barHeight;
    svg.append(svgEl("text", { x: left - 4, y: y + 10, "text-anchor": "end" }, tokens[k]));
    svg.append(svgEl("rect", { x: left, y, width: Math.max(0.5, p * (width - left - 50)),
      height: barHeight - 3, fill: "#1f77b4", "data-value": String(p) }));
    svg.append(svgEl("text", { x: left + p * (width - left - 50) + 4, y: y + 10 }, fmt(p)));
  });
  return svg;
}

// ---------------------------------------------------------------------------------------------

const main = document.getElementById("main");
const subtitles = {
  run: () => (D.run.steps.length
    ? `${D.run.n_layers} layers × ${D.run.n_heads} heads, ${D.run.steps.length} snapshots ` +
      `(steps ${D.run.steps.join(", ")})`
    : "no snapshots (shift tracking was off)"),
  comparison: () => `${D.comparison.mode} comparison`,
};
document.getElementById("subtitle").textContent = subtitles[D.kind]();
// start on the head that moved most: at the run's last snapshot, or in the comparison
if (D.run && D.run.steps.length) {
  const last = D.run.head_change.all[D.run.steps.length - 1];
  let best = -1;
  last.forEach((heads, l) => heads.forEach((v, h) => {
    if (v > best) { best = v; state.layer = l; state.head = h; }
  }));
} else if (D.comparison && D.comparison.mode === "elementwise") {
  const top = D.comparison.summary.top_heads[0];
  state.layer = top.layer;
  state.head = top.head;
}
if (D.run) runSection(D.run);
if (D.comparison) comparisonSection(D.comparison);
attentionSection(D.attention);
listeners.head.forEach((f) => f());
document.body.dataset.ready = "true";
