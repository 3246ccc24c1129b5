// pathguard's web page: plain JavaScript, no dependencies. It calls the public HTTP API
// (GET /ui/config, POST /classify, POST /perturb) exactly as any client would, and draws
// the answers. Everything the server sends is put on the page as text (textContent), never
// as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const TOP_K = 5;
const PER_LINE = 32; // filters per line of a layer's row in the path picture

const state = {
  config: null,   // GET /ui/config
  file: null,     // the current image (File or Blob)
  fileName: "",
  imageUrl: null, // object URL of the current image
};

// --- small DOM helpers --------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

const $ = (id) => document.getElementById(id);
const pct = (p) => `${(100 * p).toFixed(p > 0.999 || p < 0.001 ? 2 : 1)} %`;
const num = (x, d = 3) => Number(x).toFixed(d);

// --- messages and status ------------------------------------------------------------------

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

class ApiFailure extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The API's errors are JSON {"error": message, "code": reason}; anything else (a proxy's HTML
// page, a dropped connection) still becomes one readable sentence.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = $("key").value.trim();
  if (key) headers.set("X-API-Key", key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiFailure("Could not reach the server: check that it is running and retry.",
                         0, "network");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    if (body && typeof body.error === "string") {
      throw new ApiFailure(body.error, response.status, body.code || "");
    }
    throw new ApiFailure(`The server answered HTTP ${response.status} without an explanation.`,
                         response.status, "");
  }
  if (body === null) {
    throw new ApiFailure("The server's answer was not JSON.", response.status, "");
  }
  return body;
}

function explain(error) {
  if (!(error instanceof ApiFailure)) return `Something went wrong in the page: ${error}`;
  const code = error.code ? ` [${error.code}, HTTP ${error.status}]` : "";
  if (error.status === 401) {
    $("key-box").open = true;
    return `${error.message}${code}: enter the key under "API key" above, then try again.`;
  }
  return `${error.message}${code}`;
}

// --- configuration and samples ------------------------------------------------------------

async function loadConfig() {
  try {
    state.config = await api("/ui/config");
  } catch (e) {
    showMessage(`The page could not load its settings: ${explain(e)}`);
    return;
  }
  const cfg = state.config;
  if (cfg.key_required) {
    $("key-box").open = true;
  }
  const list = $("samples");
  list.replaceChildren();
  for (const s of cfg.samples) {
    const img = el("img", { src: s.url, alt: "", width: "48", height: "48" });
    const button = el("button", { type: "button", class: "sample",
                                  "aria-label": `test image of class ${s.label}` },
                      img, el("span", { text: s.label }));
    button.addEventListener("click", () => useSample(s));
    list.append(el("li", {}, button));
  }
  $("samples-box").hidden = cfg.samples.length === 0;
  if (cfg.perturb.enabled) {
    $("perturb").hidden = false;
    const eps = $("eps");
    eps.max = String(cfg.perturb.max_eps);
    eps.value = String(Number(cfg.perturb.default_eps.toFixed(6)));
    $("eps-max").textContent = String(cfg.perturb.max_eps);
    updateEps255();
  }
}

async function useSample(sample) {
  clearMessage();
  try {
    const response = await fetch(sample.url);
    if (!response.ok) throw new ApiFailure(`The sample image could not be loaded ` +
                                           `(HTTP ${response.status}).`, response.status, "");
    const blob = await response.blob();
    await analyse(blob, sample.url.split("/").pop());
  } catch (e) {
    showMessage(explain(e));
  }
}

// --- classify -----------------------------------------------------------------------------

async function analyse(file, name) {
  clearMessage();
  state.file = file;
  state.fileName = name || "image";
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(file);
  $("perturb-body").replaceChildren();
  $("perturb-button").disabled = true;
  setStatus(`Analysing ${state.fileName}…`);
  const form = new FormData();
  form.append("file", file, state.fileName);
  let result;
  try {
    result = await api(`/classify?top_k=${TOP_K}&filters=true`, { method: "POST", body: form });
  } catch (e) {
    setStatus("");
    $("result").hidden = true;
    showMessage(explain(e));
    return;
  }
  setStatus(`${state.fileName}: ${result.prediction.label}, ${result.adversarial.verdict}.`);
  const body = $("result-body");
  body.replaceChildren(
    el("div", { class: "result-grid" },
       summary(result, state.imageUrl, "the uploaded image"),
       el("div", { class: "paths" },
          pathFigure(result, "own", "This image's path",
                     `coloured by how unusual each filter's state is for class ` +
                     `"${result.prediction.label}"`),
          pathFigure(result, "typical", `Typical path of "${result.prediction.label}"`,
                     "share of the class's clean training images that open each filter"))));
  $("result").hidden = false;
  $("perturb-button").disabled = !(state.config && state.config.perturb.enabled);
}

// Prediction with top-k, score against threshold with the verdict, most anomalous layers.
function summary(result, imageUrl, alt, title) {
  const p = result.prediction;
  const a = result.adversarial;
  const outer = el("div", { class: "summary" });
  if (title) outer.append(el("h3", { text: title }));
  let box = el("div", { class: "what" });
  outer.append(box);
  box.append(el("img", { class: "preview", src: imageUrl, alt }));
  box.append(el("p", { class: "prediction" },
                el("span", { class: "label", text: p.label }),
                el("span", { class: "confidence", text: ` ${pct(p.confidence)}` })));
  const top = el("ol", { class: "topk", "aria-label": "most probable classes" });
  for (const c of p.top_k) {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(0.5, 100 * c.probability)}%`;
    top.append(el("li", {}, el("span", { class: "name", text: c.label }),
                  el("span", { class: "track" }, bar),
                  el("span", { class: "value", text: pct(c.probability) })));
  }
  box.append(top);

  box = el("div", { class: "judged" });
  outer.append(box);
  const verdict = el("p", { class: `verdict ${a.verdict}` },
                     el("strong", { text: a.verdict === "adversarial" ? "Adversarial" : "Clean" }),
                     ` · score ${num(a.score)} ${a.flagged ? ">" : "≤"} threshold ${num(a.threshold)}`);
  box.append(verdict);
  const gauge = el("div", { class: "gauge", role: "img",
                            "aria-label": `adversarial score ${num(a.score)} of 1, threshold ` +
                                          `${num(a.threshold)}` });
  const fill = el("span", { class: `fill ${a.verdict}` });
  fill.style.width = `${100 * a.score}%`;
  const mark = el("span", { class: "threshold" });
  mark.style.left = `${100 * a.threshold}%`;
  gauge.append(fill, mark);
  box.append(gauge);
  const fpr = a.clean_fpr == null ? "" : `; ${pct(a.clean_fpr)} of held-out clean images ` +
                                         `score above it`;
  const bound = a.fpr_confidence == null ? "" : ` (at most, with ${pct(a.fpr_confidence)} ` +
                                                `confidence)`;
  box.append(el("p", { class: "hint",
                       text: `The threshold was set for ${pct(a.target_fpr)}${bound} false ` +
                             `alarms on clean images${fpr}.` }));

  const layers = (result.path.layers || []).slice(0, 3);
  if (layers.length) {
    box.append(el("h4", { text: "Most anomalous layers" }));
    const list = el("ul", { class: "anomalies" });
    for (const l of layers) {
      const level = l.anomaly >= 3 ? "unusual" : l.anomaly >= 1.5 ? "raised" : "typical";
      list.append(el("li", { class: level },
                     el("code", { text: l.name }),
                     ` z = ${num(l.anomaly, 1)} (${level}), ${l.open}/${l.total} open`));
    }
    box.append(list);
  }
  box.append(el("p", { class: "hint",
                       text: `${pct(result.path.open_fraction)} of gated filters open, ` +
                             `${pct(result.path.flops_fraction)} of the dense network's ` +
                             `multiply-accumulates.` }));
  if (result.input && result.input.note) {
    box.append(el("p", { class: "hint note", text: result.input.note }));
  }
  return outer;
}

// --- the path as a picture ----------------------------------------------------------------

// Cells: bright = open, pale = closed; blue = usual for the predicted class, red = unusual
// (the class's images mostly have the other state). Typical path: white to blue by how often
// the class opens the filter.
const OPEN = [29, 78, 216], OPEN_ODD = [220, 38, 38];
const SHUT = [226, 232, 240], SHUT_ODD = [252, 165, 165];
const PALE = [248, 250, 252];

function mix(a, b, t) {
  const c = a.map((v, i) => Math.round(v + (b[i] - v) * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function cellColour(kind, open, freq) {
  if (kind === "typical") return mix(PALE, OPEN, freq);
  const unusual = open ? 1 - freq : freq;
  return open ? mix(OPEN, OPEN_ODD, unusual) : mix(SHUT, SHUT_ODD, unusual);
}

function describeCell(kind, layer, i, label) {
  const f = layer.filters;
  const freq = f.class_frequency[i];
  const share = `${pct(freq)} of "${label}" images open it`;
  if (kind === "typical") return `${layer.name}, filter ${i}: ${share}.`;
  const open = f.open[i];
  const unusual = open ? 1 - freq : freq;
  const judged = unusual >= 0.9 ? "very unusual" : unusual >= 0.5 ? "unusual" : "usual";
  return `${layer.name}, filter ${i}: ${open ? "open" : "closed"} (${judged} for "${label}"); ` +
         `${share}.`;
}

// One row per gated layer (execution order), one cell per filter (a layer of more than
// PER_LINE filters wraps onto more lines, filter index left to right, then down). The figure
// is focusable:
// arrow keys move between cells and the line under it describes the current one (as does
// hovering or tapping a cell).
function pathFigure(result, kind, title, caption) {
  const layers = (result.path.layers || []).filter((l) => l.filters)
    .sort((a, b) => a.depth - b.depth);
  const label = result.prediction.label;
  const fig = el("figure", { class: `path path-${kind}` });
  fig.append(el("figcaption", {}, el("strong", { text: title }), el("br"),
                el("span", { class: "hint", text: caption })));
  if (!layers.length) {
    fig.append(el("p", { class: "hint", text: "No per-filter path in this answer." }));
    return fig;
  }
  const perLine = Math.min(PER_LINE, Math.max(...layers.map((l) => l.total)));
  const info = el("p", { class: "cell-info", "aria-live": "polite" });
  const grid = el("div", {
    class: "path-grid", tabindex: "0", role: "group",
    "aria-label": `${title}: ${layers.length} gated layers; use the arrow keys to read ` +
                  `each filter`,
  });
  const rects = [];
  layers.forEach((layer, row) => {
    const size = 10;
    const lines = Math.ceil(layer.total / perLine);
    const svg = svgEl("svg", { viewBox: `0 0 ${perLine * size} ${lines * size}`,
                               preserveAspectRatio: "xMinYMin meet", "aria-hidden": "true",
                               class: "row" });
    const cells = [];
    for (let i = 0; i < layer.total; i++) {
      const open = layer.filters.open[i];
      const x = (i % perLine) * size, y = Math.floor(i / perLine) * size;
      const rect = svgEl("rect", { x: x + 0.5, y: y + 0.5, width: size - 1, height: size - 1,
                                   fill: cellColour(kind, open, layer.filters.class_frequency[i]),
                                   class: open ? "on" : "off" });
      const tip = svgEl("title");
      tip.textContent = describeCell(kind, layer, i, label);
      rect.append(tip);
      rect.addEventListener("mouseenter", () => select(row, i));
      rect.addEventListener("click", () => select(row, i));
      svg.append(rect);
      cells.push(rect);
    }
    rects.push(cells);
    const flag = kind === "own" && layer.anomaly >= 3 ? " ⚠" : "";
    grid.append(el("div", { class: "path-row" },
                   el("span", { class: "layer-name", title: layer.name,
                                text: `${layer.name} ${layer.open}/${layer.total}${flag}` }),
                   svg));
  });
  let current = null;
  let cursor = null;
  function select(row, col) {
    if (current) current.classList.remove("current");
    current = rects[row][col];
    current.classList.add("current");
    info.textContent = describeCell(kind, layers[row], col, label);
    cursor = [row, col];
  }
  grid.addEventListener("keydown", (event) => {
    const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0],
                    Home: [0, -1e6], End: [0, 1e6] };
    const move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    let [row, col] = cursor || [0, -1];
    row = Math.min(layers.length - 1, Math.max(0, row + move[0]));
    col = Math.min(layers[row].total - 1, Math.max(0, col + move[1]));
    select(row, col);
  });
  grid.addEventListener("focus", () => { if (!cursor) select(0, 0); });
  fig.append(grid, info, legend(kind));
  return fig;
}

function legend(kind) {
  const items = kind === "typical"
    ? [[mix(PALE, OPEN, 0), "never open"], [mix(PALE, OPEN, 0.5), "half"],
       [mix(PALE, OPEN, 1), "always open"]]
    : [[mix(OPEN, OPEN_ODD, 0), "open, usual"], [mix(OPEN, OPEN_ODD, 1), "open, unusual"],
       [mix(SHUT, SHUT_ODD, 0), "closed, usual"], [mix(SHUT, SHUT_ODD, 1), "closed, unusual"]];
  const list = el("ul", { class: "legend" });
  for (const [colour, text] of items) {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour;
    list.append(el("li", {}, swatch, text));
  }
  return list;
}

// --- perturb ------------------------------------------------------------------------------

function updateEps255() {
  const eps = Number($("eps").value);
  $("eps-255").textContent = Number.isFinite(eps) && eps > 0 ? `= ${(eps * 255).toFixed(1)}/255`
                                                             : "";
}

async function perturb(event) {
  event.preventDefault();
  clearMessage();
  if (!state.file) {
    showMessage("Choose an image first.");
    return;
  }
  const eps = Number($("eps").value);
  const max = state.config.perturb.max_eps;
  if (!(eps > 0 && eps <= max)) {
    showMessage(`eps must be a number above 0 and at most ${max}.`);
    $("eps").focus();
    return;
  }
  const attack = $("attack").value;
  const button = $("perturb-button");
  button.disabled = true;
  setStatus(`Crafting a ${attack.toUpperCase()} copy at eps ${eps}…`);
  const form = new FormData();
  form.append("file", state.file, state.fileName);
  let answer;
  try {
    answer = await api(`/perturb?attack=${attack}&eps=${eps}&top_k=${TOP_K}&filters=true`,
                       { method: "POST", body: form });
  } catch (e) {
    setStatus("");
    showMessage(explain(e));
    button.disabled = false;
    return;
  }
  button.disabled = false;
  const o = answer.original, p = answer.perturbed, a = answer.attack;
  const changed = a.prediction_changed
    ? `The prediction changed from "${o.prediction.label}" to "${p.prediction.label}"`
    : `The prediction stayed "${o.prediction.label}"`;
  const caught = p.adversarial.flagged ? "the detector flags the perturbed copy"
                                       : "the detector does not flag the perturbed copy";
  setStatus(`${a.name.toUpperCase()} at eps ${a.eps}: ${changed.toLowerCase()}; ${caught}.`);
  const column = (result, url, title, alt) => el("div", { class: "column" },
    summary(result, url, alt, title),
    pathFigure(result, "own", `Path of the ${title.toLowerCase()}`,
               `against class "${result.prediction.label}"`));
  $("perturb-body").replaceChildren(
    el("p", { class: "perturb-summary" },
       `${changed}; ${caught} (largest pixel change ${num(a.linf)} = ` +
       `${(a.linf * 255).toFixed(1)}/255, crafted in ${Math.round(answer.timing.craft_ms)} ms).`),
    el("div", { class: "compare" },
       column(o, state.imageUrl, "Original", "the uploaded image"),
       column(p, answer.image, "Perturbed", `its ${a.name.toUpperCase()} copy`)));
}

// --- wiring -------------------------------------------------------------------------------

function start() {
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    if (f) analyse(f, f.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) analyse(f, f.name);
    else showMessage("Drop an image file (PNG, JPEG, WebP or BMP).");
  });
  $("perturb-form").addEventListener("submit", perturb);
  $("eps").addEventListener("input", updateEps255);
  loadConfig();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
