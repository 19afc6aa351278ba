// The DETR explorer: one image, its detections (filtered here by the slider, no new model run), the decoder
// attention of a detection and the encoder self-attention at a pixel, drawn on one canvas. No dependencies.
"use strict";

const PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                 [70, 240, 240], [240, 50, 230], [210, 245, 60], [0, 128, 128], [170, 110, 40]];
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const OVERLAY_ALPHA = 0.6;
const MAX_CANVAS_WIDTH = 900;

const $ = (id) => document.getElementById(id);
const state = {
  model: null, blob: null, image: null, scale: 1, data: null, overlay: null, point: null,
  selected: null, panoptic: null, headMaps: {},
};
window.explorer = state; // for tests and the console

function colourFor(label) { return PALETTE[((label % PALETTE.length) + PALETTE.length) % PALETTE.length]; }
function rgb(c) { return `rgb(${c[0]}, ${c[1]}, ${c[2]})`; }

function viridis(v) {
  const x = Math.min(Math.max(v, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const t = x - i;
  return VIRIDIS[i].map((a, k) => Math.round(a + t * (VIRIDIS[i + 1][k] - a)));
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = $("apikey").value || sessionStorage.getItem("detr-api-key") || "";
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = `${response.status}: ${(await response.json()).error}`; } catch (e) { /* not JSON */ }
    if (response.status === 401) $("apikey").focus();
    throw new Error(message);
  }
  return response;
}

// --- the model and the image ---------------------------------------------------------------------------

async function loadModel() {
  try {
    state.model = await (await api("/v1/model")).json();
  } catch (err) {
    setStatus(`model info: ${err.message}`, true);
    return;
  }
  const m = state.model;
  $("model-name").textContent = `${m.name} (${m.type}, ${m.num_queries} queries)`;
  $("panoptic-label").hidden = !m.panoptic;
  $("reference-label").hidden = !m.anchor_queries;
  const heads = (m.config && m.config.transformer && m.config.transformer.nheads) || 0;
  for (let h = 0; h < heads; h++) $("head").add(new Option(`head ${h + 1}`, String(h)));
  try {
    const listing = await (await api("/v1/images")).json();
    for (const name of listing.images) $("gallery").add(new Option(name, name));
    $("gallery-label").hidden = listing.images.length === 0;
  } catch (err) { /* no --images folder */ }
}

async function loadBlob(blob, label) {
  state.blob = blob;
  state.data = null; state.overlay = null; state.point = null; state.selected = null; state.panoptic = null;
  state.headMaps = {};
  $("panoptic").checked = false;
  const url = URL.createObjectURL(blob);
  const image = new Image();
  try {
    await new Promise((resolve, reject) => { image.onload = resolve; image.onerror = () => reject(new Error("the browser cannot read this image")); image.src = url; });
  } catch (err) { setStatus(err.message, true); return; }
  state.image = image;
  state.scale = Math.min(1, MAX_CANVAS_WIDTH / image.naturalWidth);
  const canvas = $("view");
  canvas.width = Math.round(image.naturalWidth * state.scale);
  canvas.height = Math.round(image.naturalHeight * state.scale);
  state.point = [image.naturalWidth / 2, image.naturalHeight / 2];
  render();
  setStatus(`running the model on ${label} ...`);
  try {
    const all = Math.min(state.model ? state.model.num_queries : 100, 100);
    const response = await api(`/v1/attention?threshold=0&max_detections=${all}`, { method: "POST", body: blob });
    state.data = await response.json();
  } catch (err) { setStatus(`detection failed: ${err.message}`, true); return; }
  listDetections();
  render();
  setStatus(`${label}: ${visibleDetections().length} detections above ${threshold().toFixed(2)} `
            + `(${state.data.ms} ms); click one, or switch to encoder mode and click a pixel`);
  document.body.dataset.ready = "1";
}

// --- detections ------------------------------------------------------------------------------------------

function threshold() { return parseFloat($("threshold").value); }
function visibleDetections() {
  if (!state.data) return [];
  return state.data.detections.map((d, i) => ({ ...d, index: i })).filter((d) => d.score > threshold());
}

function listDetections() {
  const list = $("detections");
  list.replaceChildren();
  state.data.detections.forEach((d, i) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `${d.name} ${d.score.toFixed(3)}`;
    button.dataset.index = String(i);
    button.dataset.query = String(d.query);
    button.style.setProperty("--colour", rgb(colourFor(d.label)));
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", () => selectDetection(i));
    button.addEventListener("mouseenter", () => { state.hover = i; render(); });
    button.addEventListener("mouseleave", () => { state.hover = null; render(); });
    item.appendChild(button);
    list.appendChild(item);
  });
  applyThreshold();
}

function applyThreshold() {
  $("threshold-value").textContent = threshold().toFixed(2);
  if (!state.data) return;
  for (const item of $("detections").children) {
    const d = state.data.detections[Number(item.firstChild.dataset.index)];
    item.hidden = !(d.score > threshold());
  }
  if (state.selected !== null && !(state.data.detections[state.selected].score > threshold())) {
    state.selected = null;
    if (state.overlay && state.overlay.kind === "decoder") state.overlay = null;
  }
  render();
}

async function selectDetection(index) {
  state.selected = index;
  for (const b of $("detections").querySelectorAll("button")) b.setAttribute("aria-pressed", String(Number(b.dataset.index) === index));
  const d = state.data.detections[index];
  const head = $("head").value;
  let map = state.data.decoder[index];
  if (head !== "mean") {
    if (!state.headMaps[d.query]) {
      setStatus(`per-head maps of query ${d.query} ...`);
      try {
        const r = await api(`/v1/attention?threshold=0&max_detections=${state.data.detections.length}&queries=${d.query}&heads=1`,
                            { method: "POST", body: state.blob });
        state.headMaps[d.query] = (await r.json()).decoder_heads[0];
      } catch (err) { setStatus(`attention failed: ${err.message}`, true); return; }
    }
    map = state.headMaps[d.query][Number(head)];
  }
  state.overlay = { kind: "decoder", map, index };
  render();
  setStatus(`decoder attention of ${d.name} ${d.score.toFixed(3)} (query ${d.query}, ${head === "mean" ? "mean of heads" : "head " + (Number(head) + 1)})`);
  document.body.dataset.overlay = "decoder";
}

async function encoderAt(x, y) {
  if (!state.blob) return;
  state.point = [x, y];
  setStatus(`encoder attention at (${Math.round(x)}, ${Math.round(y)}) ...`);
  try {
    const r = await api(`/v1/attention?threshold=0&max_detections=1&points=${x.toFixed(1)},${y.toFixed(1)}`,
                        { method: "POST", body: state.blob });
    const data = await r.json();
    if (!data.encoder) { setStatus("this model has no encoder layers", true); return; }
    state.overlay = { kind: "encoder", map: data.encoder[0], point: [x, y] };
  } catch (err) { setStatus(`attention failed: ${err.message}`, true); return; }
  render();
  setStatus(`encoder self-attention at (${Math.round(x)}, ${Math.round(y)})`);
  document.body.dataset.overlay = "encoder";
}

// --- panoptic --------------------------------------------------------------------------------------------

async function togglePanoptic() {
  if (!$("panoptic").checked) { state.panoptic = null; $("legend").replaceChildren(); $("legend-title").hidden = true; render(); return; }
  if (!state.blob) return;
  setStatus("panoptic segmentation ...");
  try {
    const data = await (await api("/v1/panoptic", { method: "POST", body: state.blob })).json();
    const png = new Image();
    await new Promise((resolve, reject) => { png.onload = resolve; png.onerror = reject; png.src = `data:image/png;base64,${data.segment_ids_png}`; });
    const off = document.createElement("canvas");
    off.width = png.width; off.height = png.height;
    const ctx = off.getContext("2d");
    ctx.drawImage(png, 0, 0);
    const pixels = ctx.getImageData(0, 0, off.width, off.height);
    const colours = new Map(data.segments.map((s, i) => [s.id, colourFor(i)]));
    for (let p = 0; p < pixels.data.length; p += 4) {
      const id = pixels.data[p] + 256 * pixels.data[p + 1] + 65536 * pixels.data[p + 2];
      const c = colours.get(id);
      if (c) { pixels.data[p] = c[0]; pixels.data[p + 1] = c[1]; pixels.data[p + 2] = c[2]; pixels.data[p + 3] = 255; }
      else pixels.data[p + 3] = 0;
    }
    ctx.putImageData(pixels, 0, 0);
    state.panoptic = off;
    const legend = $("legend");
    legend.replaceChildren();
    data.segments.forEach((s, i) => {
      const item = document.createElement("li");
      item.style.setProperty("--colour", rgb(colourFor(i)));
      item.textContent = `${s.name} (${s.isthing ? "thing" : "stuff"}, ${s.area} px)`;
      legend.appendChild(item);
    });
    $("legend-title").hidden = false;
    setStatus(`${data.segments.length} panoptic segments`);
  } catch (err) { setStatus(`panoptic failed: ${err.message}`, true); $("panoptic").checked = false; }
  render();
}

// --- drawing ---------------------------------------------------------------------------------------------

function drawMap(ctx, map) {
  // A feature cell covers stride x stride input pixels; the input is the image resized to input_size.
  const d = state.data;
  const h = map.length, w = map[0].length;
  let lo = Infinity, hi = -Infinity;
  for (const row of map) for (const v of row) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const off = document.createElement("canvas");
  off.width = w; off.height = h;
  const octx = off.getContext("2d");
  const cells = octx.createImageData(w, h);
  for (let i = 0; i < h; i++) for (let j = 0; j < w; j++) {
    const c = viridis((map[i][j] - lo) / Math.max(hi - lo, 1e-12));
    cells.data.set([c[0], c[1], c[2], 255], 4 * (i * w + j));
  }
  octx.putImageData(cells, 0, 0);
  const sx = d.stride * d.image.width / d.input_size.width * state.scale;
  const sy = d.stride * d.image.height / d.input_size.height * state.scale;
  ctx.save();
  ctx.imageSmoothingEnabled = false; // one solid block per feature cell: the map's real resolution
  ctx.globalAlpha = OVERLAY_ALPHA;
  ctx.drawImage(off, 0, 0, w * sx, h * sy);
  ctx.restore();
}

function render() {
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.image) return;
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const s = state.scale;
  if (state.panoptic) {
    ctx.save(); ctx.globalAlpha = 0.5; ctx.imageSmoothingEnabled = false;
    ctx.drawImage(state.panoptic, 0, 0, canvas.width, canvas.height); ctx.restore();
  }
  if (state.overlay && state.data) drawMap(ctx, state.overlay.map);
  if (!state.data) return;
  const showReference = $("reference").checked && state.data.reference_boxes;
  for (const d of visibleDetections()) {
    const focus = d.index === state.selected || d.index === state.hover;
    const [x0, y0, x1, y1] = d.box_xyxy.map((v) => Math.round(v * s));
    const colour = colourFor(d.label);
    ctx.lineWidth = focus ? 5 : 3;
    ctx.strokeStyle = rgb(colour);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    if (showReference) {
      const [r0, q0, r1, q1] = state.data.reference_boxes[d.index].map((v) => Math.round(v * s));
      ctx.save(); ctx.setLineDash([5, 4]); ctx.lineWidth = 2; // dashed black on white: visible on any image
      ctx.strokeStyle = "#fff"; ctx.strokeRect(r0, q0, r1 - r0, q1 - q0);
      ctx.lineDashOffset = 5; ctx.strokeStyle = "#000"; ctx.strokeRect(r0, q0, r1 - r0, q1 - q0); ctx.restore();
    }
    const text = `${d.name} ${d.score.toFixed(2)}`;
    ctx.font = "12px system-ui, sans-serif";
    const tw = ctx.measureText(text).width + 6;
    const ty = Math.max(y0 - 16, 0);
    ctx.fillStyle = rgb(colour);
    ctx.fillRect(Math.max(x0, 0), ty, tw, 16);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, Math.max(x0, 0) + 3, ty + 12);
  }
  if (state.overlay && state.overlay.kind === "encoder" || $("view") === document.activeElement && mode() === "encoder") {
    const [px, py] = (state.overlay && state.overlay.point) || state.point;
    ctx.beginPath(); ctx.arc(px * s, py * s, 5, 0, 2 * Math.PI);
    ctx.fillStyle = "#ff1744"; ctx.fill(); ctx.lineWidth = 2; ctx.strokeStyle = "#fff"; ctx.stroke();
  }
}

// --- input -----------------------------------------------------------------------------------------------

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function canvasPoint(event) {
  const rect = $("view").getBoundingClientRect();
  const k = $("view").width / rect.width; // CSS may shrink the canvas
  return [(event.clientX - rect.left) * k / state.scale, (event.clientY - rect.top) * k / state.scale];
}

function detectionAt(x, y) {
  // The smallest visible box containing the point: nested boxes stay reachable.
  let best = null, area = Infinity;
  for (const d of visibleDetections()) {
    const [x0, y0, x1, y1] = d.box_xyxy;
    const a = (x1 - x0) * (y1 - y0);
    if (x >= x0 && x <= x1 && y >= y0 && y <= y1 && a < area) { best = d.index; area = a; }
  }
  return best;
}

function setup() {
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) loadBlob(e.target.files[0], e.target.files[0].name); });
  $("gallery").addEventListener("change", async (e) => {
    const name = e.target.value;
    if (!name) return;
    try {
      const blob = await (await api(`/v1/images/${name.split("/").map(encodeURIComponent).join("/")}`)).blob();
      loadBlob(blob, name);
    } catch (err) { setStatus(`cannot load ${name}: ${err.message}`, true); }
  });
  $("threshold").addEventListener("input", applyThreshold);
  $("apikey").addEventListener("change", () => sessionStorage.setItem("detr-api-key", $("apikey").value));
  $("head").addEventListener("change", () => { if (state.selected !== null) selectDetection(state.selected); });
  $("reference").addEventListener("change", render);
  $("panoptic").addEventListener("change", togglePanoptic);
  $("clear").addEventListener("click", () => { state.overlay = null; state.selected = null; render(); setStatus("overlay cleared"); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) loadBlob(file, file.name);
  });
  const canvas = $("view");
  canvas.addEventListener("click", (e) => {
    if (!state.data) return;
    const [x, y] = canvasPoint(e);
    if (mode() === "encoder") { encoderAt(x, y); return; }
    const index = detectionAt(x, y);
    if (index !== null) selectDetection(index);
  });
  canvas.addEventListener("mousemove", (e) => {
    if (!state.data || mode() !== "decoder") return;
    const [x, y] = canvasPoint(e);
    const index = detectionAt(x, y);
    if (index !== state.hover) { state.hover = index; render(); }
  });
  canvas.addEventListener("keydown", (e) => {
    if (!state.image) return;
    const step = 8 / state.scale;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[e.key]) {
      e.preventDefault();
      state.point = [Math.min(Math.max(state.point[0] + moves[e.key][0], 0), state.image.naturalWidth - 1),
                     Math.min(Math.max(state.point[1] + moves[e.key][1], 0), state.image.naturalHeight - 1)];
      if (state.overlay && state.overlay.kind === "encoder") state.overlay.point = state.point;
      render();
    } else if (e.key === "Enter") {
      e.preventDefault();
      encoderAt(state.point[0], state.point[1]);
    }
  });
  canvas.addEventListener("focus", render);
  canvas.addEventListener("blur", render);
  const saved = sessionStorage.getItem("detr-api-key");
  if (saved) $("apikey").value = saved;
  loadModel();
}

setup();
