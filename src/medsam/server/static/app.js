// MedSAM workbench page: plain JavaScript, no build step, no external resources.
// Coordinates: x = column, y = row of the current slice, in image pixels (as the API).
"use strict";

const $ = (sel) => document.querySelector(sel);
const WINDOWS = ["auto", "minmax", "soft_tissue", "lung", "brain", "bone", "liver"];
const MAX_STROKES = 64, MAX_STROKE_VERTICES = 4096;  // SegmentRequest.scribbles limits

const S = {
  token: sessionStorage.getItem("medsam-token") || "",
  images: [], scores: {},
  id: null, meta: null, slice: 0, window: "auto", zoom: 1,
  tool: "box", brush: 4,
  defs: [], active: 1, version: 0,
  bitmap: null, W: 0, H: 0,
  saved: null,     // Uint8Array: the slice as last saved
  work: null,      // Uint8Array: the slice as shown / edited
  base: null,      // Uint8Array: work before the current model proposal (null: no proposal)
  box: null, points: [], scribbles: [], handle: null, cands: null, candIdx: 0, segInfo: "", maskPrompt: false, prompts: [], edits: [],
  undo: [], drag: null, busy: false,
  trainJob: null,  // id of the training job being followed
  keys: {},        // image id -> label -> Set of slices accepted by hand (key slices for propagation)
};

// ------------------------------------------------------------------ helpers
function setStatus(text, error = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (S.token) headers["Authorization"] = "Bearer " + S.token;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
  }
  const res = await fetch(path, { method: opts.method || "GET", headers, body: opts.body });
  if (res.status === 401) {
    $("#token-form").classList.remove("hidden");
    throw new Error("a valid access token is needed");
  }
  if (!res.ok) {
    let detail = res.statusText;
    try { const j = await res.json(); detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); } catch (e) { /* not JSON */ }
    const err = new Error(`${res.status}: ${detail}`);
    err.status = res.status;
    throw err;
  }
  return res;
}
const getJSON = async (path) => (await api(path)).json();
const enc = (id) => id.split("/").map(encodeURIComponent).join("/");

function rleDecode(rle) {
  const n = rle.shape.reduce((a, b) => a * b, 1);
  const out = new Uint8Array(n);
  let i = 0;
  for (let r = 0; r < rle.values.length; r++) {
    out.fill(rle.values[r], i, i + rle.counts[r]);
    i += rle.counts[r];
  }
  return out;
}

function rleEncode(arr) {
  const values = [], counts = [];
  let v = arr[0], c = 0;
  for (let i = 0; i < arr.length; i++) {
    if (arr[i] === v) { c++; } else { values.push(v); counts.push(c); v = arr[i]; c = 1; }
  }
  if (arr.length) { values.push(v); counts.push(c); }
  return { shape: [S.H, S.W], values, counts };
}

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

const dirty = () => S.work && S.saved && S.work.some((v, i) => v !== S.saved[i]);

// ------------------------------------------------------------------ images
async function loadInfo() {
  const info = await getJSON("/info");
  $("#token-form").classList.add("hidden");
  const m = info.model;
  // Corrections pass the previous mask's logits back only to SAM's own weights, which were trained
  // with mask prompts; MedSAM and LiteMedSAM were not, and they made corrections worse
  // (docs/workbench.md, "Corrections").
  S.maskPrompt = m.contract === "sam";
  const el = $("#model-info");
  el.textContent = `model ${m.name} (${m.contract})` + (m.untrained_default ? " — untrained: masks are meaningless" : "");
  el.classList.toggle("warn", !!m.untrained_default);
}

async function loadImages() {
  const data = await getJSON("/images");
  S.images = data.images;
  renderImageList();
}

function renderImageList() {
  const ul = $("#image-list");
  ul.textContent = "";
  for (const im of S.images) {
    const li = document.createElement("li");
    li.dataset.id = im.id;
    if (im.id === S.id) li.classList.add("current");
    const name = document.createElement("span");
    name.textContent = im.id;
    const badge = document.createElement("span");
    badge.className = "badge " + im.status;
    badge.textContent = im.status === "labelled" ? `v${im.label_version}` : "new";
    li.append(badge, name);
    const sc = S.scores[im.id];
    if (sc !== undefined && sc !== null) {
      const s = document.createElement("span");
      s.className = "score";
      s.textContent = sc.toFixed(2);
      s.title = "uncertainty";
      li.append(s);
    }
    li.addEventListener("click", () => openImage(im.id));
    ul.append(li);
  }
}

async function openImage(id) {
  if (dirty() && !confirm("Unsaved edits on this slice will be lost. Continue?")) return;
  try {
    S.id = id;
    S.meta = await getJSON(`/images/${enc(id)}`);
    const info = await getJSON(`/labels/${enc(id)}`);
    S.defs = info.labels;
    S.version = info.version;
    if (!S.defs.some((d) => d.value === S.active)) S.active = S.defs.length ? S.defs[0].value : 1;
    S.slice = Math.floor(S.meta.n_slices / 2);
    const slider = $("#slice-slider");
    slider.max = S.meta.n_slices - 1;
    slider.value = S.slice;
    $("#propagate-btn").disabled = !S.meta.is_volume;
    renderInfo();
    renderImageList();
    renderLabels();
    await loadSlice(S.slice, true);
    fitZoom();
  } catch (e) {
    setStatus(`cannot open ${id}: ${e.message}`, true);
  }
}

function renderInfo() {
  const m = S.meta;
  if (!m) return;
  $("#image-info").textContent =
    `${m.id}\nshape ${m.shape.join("×")} (${m.axes})\nspacing x,y${m.spacing_xyz.length > 2 ? ",z" : ""}: ` +
    `${m.spacing_xyz.map((v) => v.toFixed(3)).join(", ")} mm\n${m.source_format || ""} ${m.modality || ""}\n` +
    `label version ${S.version}`;
}

async function loadSlice(k, force = false) {
  if (!S.meta) return;
  k = Math.max(0, Math.min(S.meta.n_slices - 1, k));
  if (k === S.slice && !force) return;
  if (!force && dirty() && !confirm("Unsaved edits on this slice will be lost. Continue?")) return;
  S.slice = k;
  $("#slice-slider").value = k;
  $("#slice-label").textContent = `${k + 1} / ${S.meta.n_slices}`;
  const win = encodeURIComponent(S.window);
  const [png, lab] = await Promise.all([
    api(`/images/${enc(S.id)}/slices/${k}.png?window=${win}`).then((r) => r.blob()),
    getJSON(`/labels/${enc(S.id)}/slices/${k}`),
  ]);
  S.bitmap = await createImageBitmap(png);
  [S.H, S.W] = lab.mask.shape;
  S.version = lab.version;
  S.saved = rleDecode(lab.mask);
  S.work = S.saved.slice();
  resetPrompts();
  S.undo = [];
  draw();
  $("#canvas").dataset.slice = String(k);
  renderInfo();
  setStatus(`slice ${k + 1} of ${S.meta.n_slices}, label version ${S.version}`);
}

async function reloadBitmap() {
  if (!S.meta) return;
  const png = await api(`/images/${enc(S.id)}/slices/${S.slice}.png?window=${encodeURIComponent(S.window)}`).then((r) => r.blob());
  S.bitmap = await createImageBitmap(png);
  draw();
}

function resetPrompts() {
  S.base = null; S.box = null; S.points = []; S.scribbles = []; S.handle = null; S.prompts = []; S.edits = [];
  S.cands = null; S.candIdx = 0;
}

// ------------------------------------------------------------------ labels
function renderLabels() {
  const ul = $("#label-list");
  ul.textContent = "";
  S.defs.forEach((d, i) => {
    const li = document.createElement("li");
    if (d.value === S.active) li.classList.add("current");
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = i < 9 ? String(i + 1) : "";
    const color = document.createElement("input");
    color.type = "color";
    color.value = d.color;
    color.addEventListener("input", () => { d.color = color.value; draw(); });
    const name = document.createElement("input");
    name.type = "text";
    name.value = d.name;
    name.maxLength = 64;
    name.addEventListener("change", () => { d.name = name.value || `label ${d.value}`; });
    li.append(key, color, name);
    li.addEventListener("click", (ev) => { if (ev.target === li || ev.target === key) setActive(d.value); });
    name.addEventListener("focus", () => setActive(d.value, false));
    ul.append(li);
  });
}

function setActive(value, rerender = true) {
  S.active = value;
  if (rerender) renderLabels();
  else document.querySelectorAll("#label-list li").forEach((li, i) => li.classList.toggle("current", S.defs[i].value === value));
}

const PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6", "#d2f53c", "#fabed4"];

// The next unused label value (1..255), or 0 when all are taken.
function freeLabel() {
  const used = new Set(S.defs.map((d) => d.value));
  let v = 1;
  while (used.has(v)) v++;
  return v > 255 ? 0 : v;
}

function addLabel() {
  const name = $("#new-label-name").value.trim();
  const v = freeLabel();
  if (!v) { setStatus("at most 255 labels", true); return; }
  S.defs.push({ value: v, name: name || `label ${v}`, color: PALETTE[(v - 1) % PALETTE.length] });
  $("#new-label-name").value = "";
  setActive(v);
}

// Automatic mode: every object the model finds on this slice becomes a new label where the slice
// is still unlabelled; a proposal like any other (Esc discards, Enter saves).
async function autoSlice() {
  if (!S.meta || !S.work) return;
  setStatus("finding every object of this slice…");
  try {
    let job = await (await api("/auto", { method: "POST", json: { image_id: S.id, slice_index: S.slice } })).json();
    while (job.status === "queued" || job.status === "running") {
      await new Promise((r) => setTimeout(r, 300));
      job = await getJSON(`/jobs/${job.id}`);
    }
    if (job.status !== "done") throw new Error(job.error || job.status);
    const found = rleDecode(job.result.mask);
    const objects = job.result.objects;
    pushUndo();
    if (!S.base) S.base = S.work.slice();
    const values = [];
    for (const o of objects) {
      const v = freeLabel();
      if (!v) break;
      S.defs.push({ value: v, name: `object ${v}`, color: PALETTE[(v - 1) % PALETTE.length] });
      values[o.label] = v;
    }
    S.autoDefs = (S.autoDefs || 0) + values.filter(Boolean).length;  // removed again by Esc
    let area = 0;
    for (let i = 0; i < found.length; i++) {
      const v = values[found[i]];
      if (v && S.work[i] === 0) { S.work[i] = v; area++; }
    }
    renderLabels();
    draw();
    $("#canvas").dataset.autoObjects = String(values.filter(Boolean).length);
    setStatus(`${values.filter(Boolean).length} objects proposed as new labels (${area} px); Enter saves, Esc discards`);
  } catch (e) {
    setStatus(`automatic mode failed: ${e.message}`, true);
  }
}

// ------------------------------------------------------------------ drawing
function fitZoom() {
  if (!S.W) return;
  const vp = $("#viewport");
  const z = Math.min((vp.clientWidth - 4) / S.W, (vp.clientHeight - 4) / S.H);
  setZoom(Math.max(0.25, Math.min(16, z)));
}

function setZoom(z) {
  S.zoom = Math.max(0.25, Math.min(32, z));
  $("#zoom-label").textContent = Math.round(S.zoom * 100) + "%";
  draw();
}

const overlayCanvas = document.createElement("canvas");

function draw() {
  const c = $("#canvas");
  if (!S.bitmap) return;
  const W = S.W, H = S.H, z = S.zoom;
  c.width = Math.round(W * z);
  c.height = Math.round(H * z);
  const ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(S.bitmap, 0, 0, c.width, c.height);
  // labels
  overlayCanvas.width = W;
  overlayCanvas.height = H;
  const octx = overlayCanvas.getContext("2d");
  const img = octx.createImageData(W, H);
  const colors = {};
  for (const d of S.defs) colors[d.value] = hexToRgb(d.color);
  const px = img.data;
  for (let i = 0; i < S.work.length; i++) {
    const v = S.work[i];
    if (!v) continue;
    const rgb = colors[v] || [255, 255, 255];
    const inProposal = S.base && S.base[i] !== v;
    px[4 * i] = rgb[0]; px[4 * i + 1] = rgb[1]; px[4 * i + 2] = rgb[2];
    px[4 * i + 3] = inProposal ? 150 : 110;
  }
  octx.putImageData(img, 0, 0);
  ctx.drawImage(overlayCanvas, 0, 0, c.width, c.height);
  // prompts
  const b = S.drag && S.tool === "box" ? S.drag.box : S.box;
  if (b) {
    ctx.strokeStyle = "#4fc3f7";
    ctx.lineWidth = 2;
    ctx.strokeRect(b.x0 * z, b.y0 * z, (b.x1 - b.x0 + 1) * z, (b.y1 - b.y0 + 1) * z);
  }
  const strokes = S.drag && S.drag.stroke ? S.scribbles.concat([S.drag.stroke]) : S.scribbles;
  for (const s of strokes) {
    ctx.beginPath();
    s.points.forEach((v, j) => (j ? ctx.lineTo : ctx.moveTo).call(ctx, (v.x + 0.5) * z, (v.y + 0.5) * z));
    ctx.strokeStyle = s.positive ? "#66bb6a" : "#ef5350";
    ctx.lineWidth = 3;
    ctx.lineCap = "round";  // a one-vertex stroke shows as a dot
    ctx.lineJoin = "round";
    ctx.stroke();
  }
  for (const p of S.points) {
    ctx.beginPath();
    ctx.arc((p.x + 0.5) * z, (p.y + 0.5) * z, 5, 0, 2 * Math.PI);
    ctx.fillStyle = p.positive ? "#66bb6a" : "#ef5350";
    ctx.fill();
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 1;
    ctx.stroke();
  }
}

function toImage(ev) {
  const r = $("#canvas").getBoundingClientRect();
  const x = Math.floor((ev.clientX - r.left) / S.zoom);
  const y = Math.floor((ev.clientY - r.top) / S.zoom);
  return { x: Math.max(0, Math.min(S.W - 1, x)), y: Math.max(0, Math.min(S.H - 1, y)) };
}

function pushUndo() {
  S.undo.push({
    work: S.work.slice(), base: S.base ? S.base.slice() : null, box: S.box, points: S.points.slice(), scribbles: S.scribbles.slice(),
    handle: S.handle, prompts: S.prompts.length, edits: S.edits.length,
    cands: S.cands, candIdx: S.candIdx, segInfo: S.segInfo,  // never changed in place: references do
  });
  if (S.undo.length > 50) S.undo.shift();
}

function paint(p, value) {
  const r = S.brush;
  let changed = 0;
  for (let y = Math.max(0, p.y - r); y <= Math.min(S.H - 1, p.y + r); y++) {
    for (let x = Math.max(0, p.x - r); x <= Math.min(S.W - 1, p.x + r); x++) {
      if ((x - p.x) ** 2 + (y - p.y) ** 2 > r * r) continue;
      const i = y * S.W + x;
      if (value === 0 ? S.work[i] !== 0 : S.work[i] !== value) { S.work[i] = value; changed++; }
    }
  }
  return changed;
}

// ------------------------------------------------------------------ model
function showCandidate() {
  const c = S.cands[S.candIdx];
  const record = S.prompts[S.prompts.length - 1];
  const a = record.label;  // the label the prompt was made for, whatever is active now
  for (let i = 0; i < c.mask.length; i++) {
    const b = S.base[i];
    S.work[i] = c.mask[i] && b === 0 ? a : b;
  }
  record.candidate = S.candIdx;
  record.score = c.score;
  draw();
  const which = S.cands.length > 1 ? `proposal ${S.candIdx + 1}/${S.cands.length}, ` : "";
  setStatus(`mask: ${which}${c.area} px, predicted IoU ${c.score.toFixed(3)} (${S.segInfo})` +
    " — Enter accepts, Tab next proposal, Esc discards, + / − points or scribbles refine");
  $("#canvas").dataset.maskArea = String(c.area);
  $("#canvas").dataset.candidate = String(S.candIdx);
}

function nextCandidate() {
  // only while a proposal with alternatives is shown; returns whether Tab was used
  if (!S.base || !S.cands || S.cands.length < 2 || S.busy || !S.prompts.length) return false;
  S.candIdx = (S.candIdx + 1) % S.cands.length;
  showCandidate();
  return true;
}

async function runSegment() {
  if (!S.box && !S.points.length && !S.scribbles.length) return;
  const body = { image_id: S.id, slice_index: S.slice, points: S.points, scribbles: S.scribbles, encoding: "rle", candidates: true };
  if (S.box) body.box = { x0: S.box.x0, y0: S.box.y0, x1: Math.max(S.box.x1, S.box.x0 + 1), y1: Math.max(S.box.y1, S.box.y0 + 1) };
  if (S.maskPrompt && S.handle && (S.points.length || S.scribbles.length)) body.previous = S.handle;
  setStatus("segmenting…");
  S.busy = true;
  try {
    const res = await (await api("/segment", { method: "POST", json: body })).json();
    if (!S.base) S.base = S.work.slice();
    // the proposal and the decoder's alternatives: Tab cycles through them
    S.cands = [{ mask: rleDecode(res.mask), score: res.score, area: res.area }].concat(
      (res.candidates || []).map((c) => ({ mask: rleDecode(c.mask), score: c.score, area: c.area })));
    S.candIdx = 0;
    S.handle = res.logits_handle;
    S.prompts.push({ box: body.box || null, points: S.points.slice(), scribbles: S.scribbles.slice(), score: res.score, label: S.active, candidate: 0 });
    S.segInfo = `${res.embedding_source} embedding${res.zoom_window ? ", zoomed" : ""}, ${Math.round(res.elapsed_ms)} ms` +
      (body.box ? "" : "; no box: MedSAM models need one, draw it first with B");
    showCandidate();
  } catch (e) {
    // a refused prompt is taken back, so the next one is not refused for it again
    if (e.status === 422 && S.undo.length) undo();
    setStatus(`segment failed: ${e.message}`, true);
  } finally {
    S.busy = false;
  }
}

async function accept() {
  if (!S.meta || !S.work) return;
  const body = {
    mask: rleEncode(S.work),
    definitions: S.defs,
    provenance: { prompts: S.prompts, edits: S.edits },
  };
  setStatus("saving…");
  try {
    const res = await api(`/labels/${enc(S.id)}/slices/${S.slice}`, {
      method: "PUT", json: body, headers: { "If-Match": `"${S.version}"` },
    });
    const info = await res.json();
    S.version = info.version;
    S.saved = S.work.slice();
    S.autoDefs = 0;
    rememberKeys(S.id, S.slice, S.work);
    resetPrompts();
    draw();
    setStatus(`saved: ${info.file}, version ${info.version}`);
    $("#canvas").dataset.savedVersion = String(info.version);
    renderInfo();
    const im = S.images.find((x) => x.id === S.id);
    if (im) { im.status = "labelled"; im.label_version = info.version; renderImageList(); }
  } catch (e) {
    if (e.status === 409) setStatus("not saved: this label was changed elsewhere (another tab?). Reload the slice to see it.", true);
    else setStatus(`not saved: ${e.message}`, true);
  }
}

function undo() {
  const last = S.undo.pop();
  if (!last) { setStatus("nothing to undo"); return; }
  S.work = last.work;
  S.base = last.base;
  S.box = last.box;
  S.points = last.points;
  S.scribbles = last.scribbles;
  S.handle = last.handle;
  S.cands = last.cands; S.candIdx = last.candIdx; S.segInfo = last.segInfo;
  S.prompts.length = Math.min(S.prompts.length, last.prompts);
  S.edits.length = Math.min(S.edits.length, last.edits);
  draw();
  setStatus("undone");
}

function discard() {
  if (!S.base) return;
  pushUndo();
  S.work = S.base;
  if (S.autoDefs) { S.defs.splice(S.defs.length - S.autoDefs, S.autoDefs); S.autoDefs = 0; renderLabels(); }
  resetPrompts();
  draw();
  setStatus("proposal discarded");
}

// A slice accepted by hand is a key slice of every label it holds: propagating one of them walks
// the object from all its keys (each up to the next), so a corrected slice re-propagates.
function rememberKeys(id, slice, plane) {
  const byLabel = (S.keys[id] = S.keys[id] || {});
  const present = new Set(plane);
  for (const d of S.defs) {
    const set = (byLabel[d.value] = byLabel[d.value] || new Set());
    if (present.has(d.value)) set.add(slice); else set.delete(slice);
  }
}

async function propagate() {
  if (!S.meta || !S.meta.is_volume) return;
  if (dirty()) { setStatus("accept this slice first (Enter), then propagate", true); return; }
  const others = [...((S.keys[S.id] || {})[S.active] || [])].filter((k) => k !== S.slice).sort((a, b) => a - b);
  setStatus(others.length ? `propagating from key slices ${[S.slice, ...others].sort((a, b) => a - b).join(", ")}…` : "propagating…");
  try {
    let job = await (await api("/propagate", {
      method: "POST",
      json: {
        image_id: S.id, slice_index: S.slice, label: S.active, expected_version: S.version,
        key_slices: others, replace: others.length > 0,
      },
    })).json();
    while (job.status === "queued" || job.status === "running") {
      await new Promise((r) => setTimeout(r, 300));
      job = await getJSON(`/jobs/${job.id}`);
      setStatus(`propagating… ${job.done}/${job.total}`);
    }
    if (job.status !== "done") throw new Error(job.error || job.status);
    await loadSlice(S.slice, true);
    const r = job.result;
    const im = S.images.find((x) => x.id === S.id);
    if (im) { im.status = "labelled"; im.label_version = r.version; renderImageList(); }
    setStatus(`propagated to slices ${r.slices ? r.slices.join("–") : "none"}, ${r.changed_voxels} voxels, version ${r.version}`);
  } catch (e) {
    setStatus(`propagation failed: ${e.message}`, true);
  }
}

async function suggestNext() {
  setStatus("scoring unlabelled images…");
  try {
    let job = await (await api("/next/score", { method: "POST", json: {} })).json();
    while (job.status === "queued" || job.status === "running") {
      await new Promise((r) => setTimeout(r, 400));
      job = await getJSON(`/jobs/${job.id}`);
      setStatus(`scoring… ${job.done}/${job.total}`);
    }
    const ranked = await getJSON("/next?limit=1000");
    for (const r of ranked.images) S.scores[r.image_id] = r.uncertainty;
    renderImageList();
    if (ranked.images.length) await openImage(ranked.images[0].image_id);
    else setStatus("every image is labelled");
  } catch (e) {
    setStatus(`ranking failed: ${e.message}`, true);
  }
}

async function upload(file) {
  setStatus(`uploading ${file.name}…`);
  try {
    const res = await api(`/images?name=${encodeURIComponent(file.name)}`, {
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
    });
    const { id } = await res.json();
    await loadImages();
    await openImage(id);
  } catch (e) {
    setStatus(`upload failed: ${e.message}`, true);
  }
}

// ------------------------------------------------------------------ training (human in the loop)
const fmt3 = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
const active = (job) => job.state === "queued" || job.state === "running";

function scoresText(before, after) {
  if (!before) return "";
  return `held-out DSC ${fmt3(before.dsc)}${after ? " → " + fmt3(after.dsc) : ""}, ` +
    `NSD ${fmt3(before.nsd)}${after ? " → " + fmt3(after.nsd) : ""} (${before.n_objects} objects)`;
}

async function loadModels() {
  const data = await getJSON("/train/models");
  const sel = $("#model-select");
  sel.textContent = "";
  for (const m of data.models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = (m.served ? "● " : "") + (m.source === "startup" ? "startup model" :
      `${m.id} (${m.mode}, ${m.steps} steps${m.after ? ", DSC " + fmt3(m.after.dsc) : ""})`);
    sel.append(o);
  }
  sel.value = data.served;
  const cur = data.models.find((m) => m.served);
  $("#model-served").textContent = `serving: ${cur.source === "startup" ? "startup model" : cur.id}` +
    (cur.after ? "\n" + scoresText(cur.before, cur.after) : "");
  $("#model-use-btn").disabled = data.training;
  $("#train-btn").disabled = data.training;
  return data;
}

async function useModel() {
  const id = $("#model-select").value;
  try {
    await api("/train/models/select", { method: "POST", json: { model_id: id } });
    S.handle = null;  // the server drops the logits of the previous model
    await loadInfo();
    await loadModels();
    setStatus(`now serving ${id}`);
  } catch (e) {
    setStatus(`switch failed: ${e.message}`, true);
  }
}

function showJob(job) {
  const running = active(job);
  $("#train-progress").classList.toggle("hidden", !running);
  $("#train-progress").value = job.progress;
  $("#train-cancel-btn").classList.toggle("hidden", !running);
  let t = `${job.state}: ${job.phase}`;
  if (job.phase === "training") t += ` — step ${job.step}/${job.steps}` + (job.loss !== null ? `, loss ${job.loss.toFixed(4)}` : "");
  if (job.heldout_images.length) t += `\n${job.train_images.length} training / ${job.heldout_images.length} held-out images`;
  const sc = scoresText(job.before, job.after);
  if (sc) t += "\n" + sc;
  if (job.error) t += "\n" + job.error;
  $("#train-info").textContent = t;
  $("#train-info").classList.toggle("error", job.state === "failed");
}

async function followJob(job) {
  S.trainJob = job.id;
  $("#train-btn").disabled = true;
  $("#model-use-btn").disabled = true;
  try {
    showJob(job);
    while (active(job)) {
      await new Promise((r) => setTimeout(r, 1000));
      job = await getJSON(`/train/jobs/${job.id}`);
      showJob(job);
    }
    if (job.state === "done") {
      S.handle = null;
      await loadInfo();
      setStatus(`training done, now serving ${job.model_after}: ${scoresText(job.before, job.after)}`);
    } else if (job.state === "failed") {
      setStatus(`training failed: ${job.error}`, true);
    } else {
      setStatus(`training ${job.state}; the model is unchanged`);
    }
  } catch (e) {
    setStatus(`training: ${e.message}`, true);
  } finally {
    S.trainJob = null;
    await loadModels().catch(() => {});
  }
}

async function train() {
  const steps = Math.max(1, Math.min(2000, Math.round(+$("#train-steps").value) || 20));
  try {
    const job = await (await api("/train", { method: "POST", json: { mode: $("#train-mode").value, steps } })).json();
    await followJob(job);
  } catch (e) {
    setStatus(`training not started: ${e.message}`, true);
  }
}

async function cancelTraining() {
  if (!S.trainJob) return;
  try {
    await api(`/train/jobs/${S.trainJob}`, { method: "DELETE" });
  } catch (e) {
    setStatus(`cancel failed: ${e.message}`, true);
  }
}

async function loadTraining() {
  await loadModels();
  const jobs = await getJSON("/train/jobs");
  const last = jobs[jobs.length - 1];
  if (last && active(last)) followJob(last);
  else if (last) showJob(last);
}

// ------------------------------------------------------------------ events
function setTool(t) {
  S.tool = t;
  document.querySelectorAll("#tools .tool").forEach((b) => b.classList.toggle("active", b.dataset.tool === t));
}

function bind() {
  const c = $("#canvas");
  c.addEventListener("contextmenu", (e) => e.preventDefault());
  c.addEventListener("mousedown", (ev) => {
    if (!S.bitmap || S.busy) return;
    const p = toImage(ev);
    if (S.tool === "box") {
      S.drag = { start: p, box: { x0: p.x, y0: p.y, x1: p.x, y1: p.y } };
    } else if (S.tool === "pos" || S.tool === "neg") {
      const positive = S.tool === "pos" ? ev.button !== 2 : ev.button === 2;
      pushUndo();
      S.points.push({ x: p.x, y: p.y, positive });
      draw();
      runSegment();
    } else if (S.tool === "scribble") {
      // left drag: a stroke inside the object; right drag: over background to remove
      S.drag = { stroke: { points: [p], positive: ev.button !== 2 } };
    } else {
      pushUndo();
      if (S.base) { S.base = null; S.box = null; S.points = []; S.scribbles = []; S.handle = null; }
      const value = S.tool === "eraser" || ev.button === 2 ? 0 : S.active;
      S.drag = { paint: value, changed: paint(p, value) };
      draw();
    }
  });
  window.addEventListener("mousemove", (ev) => {
    if (!S.drag) return;
    const p = toImage(ev);
    if (S.drag.stroke) {
      const pts = S.drag.stroke.points, q = pts[pts.length - 1];
      if (q.x !== p.x || q.y !== p.y) pts.push(p);
    } else if (S.drag.box) {
      const s = S.drag.start;
      S.drag.box = { x0: Math.min(s.x, p.x), y0: Math.min(s.y, p.y), x1: Math.max(s.x, p.x), y1: Math.max(s.y, p.y) };
    } else {
      S.drag.changed += paint(p, S.drag.paint);
    }
    draw();
  });
  window.addEventListener("mouseup", () => {
    const d = S.drag;
    if (!d) return;
    S.drag = null;
    if (d.box) {
      if (d.box.x1 - d.box.x0 < 2 || d.box.y1 - d.box.y0 < 2) { draw(); return; }
      pushUndo();
      if (S.base) { S.work = S.base; S.base = null; }  // a new box starts a new proposal
      S.box = d.box; S.points = []; S.scribbles = []; S.handle = null;
      runSegment();
    } else if (d.stroke) {
      if (S.scribbles.length >= MAX_STROKES) { draw(); setStatus(`at most ${MAX_STROKES} strokes per object: accept or discard first`, true); return; }
      const pts = d.stroke.points;
      if (pts.length > MAX_STROKE_VERTICES) {  // the API's limit: keep evenly spaced vertices and the end
        const step = Math.ceil(pts.length / (MAX_STROKE_VERTICES - 1));
        d.stroke.points = pts.filter((_, j) => j % step === 0).concat([pts[pts.length - 1]]);
      }
      pushUndo();
      S.scribbles.push(d.stroke);
      draw();
      runSegment();
    } else {
      S.edits.push({ tool: d.paint === 0 ? "eraser" : "brush", label: d.paint, pixels: d.changed, radius: S.brush });
    }
  });
  c.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    if (ev.ctrlKey) setZoom(S.zoom * (ev.deltaY < 0 ? 1.25 : 0.8));
    else loadSlice(S.slice + (ev.deltaY > 0 ? 1 : -1)).catch((e) => setStatus(e.message, true));
  }, { passive: false });

  document.querySelectorAll("#tools .tool").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  $("#brush-size").addEventListener("change", (e) => { S.brush = Math.max(1, Math.min(64, +e.target.value || 1)); });
  $("#window-select").addEventListener("change", (e) => { S.window = e.target.value; reloadBitmap(); });
  $("#zoom-in").addEventListener("click", () => setZoom(S.zoom * 1.25));
  $("#zoom-out").addEventListener("click", () => setZoom(S.zoom * 0.8));
  $("#zoom-fit").addEventListener("click", fitZoom);
  $("#slice-slider").addEventListener("change", (e) => loadSlice(+e.target.value));
  $("#slice-up").addEventListener("click", () => loadSlice(S.slice + 1));
  $("#slice-down").addEventListener("click", () => loadSlice(S.slice - 1));
  $("#accept-btn").addEventListener("click", accept);
  $("#undo-btn").addEventListener("click", undo);
  $("#discard-btn").addEventListener("click", discard);
  $("#propagate-btn").addEventListener("click", propagate);
  $("#auto-btn").addEventListener("click", autoSlice);
  $("#add-label-btn").addEventListener("click", addLabel);
  $("#next-btn").addEventListener("click", suggestNext);
  $("#train-btn").addEventListener("click", train);
  $("#train-cancel-btn").addEventListener("click", cancelTraining);
  $("#model-use-btn").addEventListener("click", useModel);
  $("#upload-input").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); e.target.value = ""; });
  $("#help-btn").addEventListener("click", () => $("#help").classList.toggle("hidden"));
  $("#help-close").addEventListener("click", () => $("#help").classList.add("hidden"));
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    S.token = $("#token-input").value.trim();
    sessionStorage.setItem("medsam-token", S.token);
    start();
  });

  window.addEventListener("keydown", (ev) => {
    const tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "select" || tag === "textarea") return;
    const k = ev.key;
    if ((ev.ctrlKey || ev.metaKey) && k.toLowerCase() === "z") { ev.preventDefault(); undo(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const tools = { b: "box", p: "pos", n: "neg", s: "scribble", r: "brush", e: "eraser" };
    if (tools[k.toLowerCase()]) { setTool(tools[k.toLowerCase()]); return; }
    if (/^[1-9]$/.test(k)) { const d = S.defs[+k - 1]; if (d) setActive(d.value); return; }
    switch (k) {
      case "ArrowUp": case "PageUp": ev.preventDefault(); loadSlice(S.slice + 1); break;
      case "ArrowDown": case "PageDown": ev.preventDefault(); loadSlice(S.slice - 1); break;
      case "+": case "=": setZoom(S.zoom * 1.25); break;
      case "-": setZoom(S.zoom * 0.8); break;
      case "0": fitZoom(); break;
      case "[": S.brush = Math.max(1, S.brush - 1); $("#brush-size").value = S.brush; break;
      case "]": S.brush = Math.min(64, S.brush + 1); $("#brush-size").value = S.brush; break;
      case "Enter": ev.preventDefault(); accept(); break;
      case "Tab": if (!ev.shiftKey && nextCandidate()) ev.preventDefault(); break;
      case "Escape": discard(); $("#help").classList.add("hidden"); break;
      case "g": case "G": propagate(); break;
      case "a": case "A": autoSlice(); break;
      case "w": case "W": {
        S.window = WINDOWS[(WINDOWS.indexOf(S.window) + 1) % WINDOWS.length];
        $("#window-select").value = S.window;
        reloadBitmap();
        break;
      }
      case "?": $("#help").classList.toggle("hidden"); break;
      default: break;
    }
  });
  window.addEventListener("beforeunload", (ev) => { if (dirty()) { ev.preventDefault(); ev.returnValue = ""; } });
}

async function start() {
  try {
    await loadInfo();
    await loadImages();
    setStatus(`${S.images.length} images. Open one on the left; draw a box to segment.`);
    await loadTraining();
  } catch (e) {
    setStatus(e.message, true);
  }
}

// A token may arrive in the URL fragment (#token=...): it is never sent to the server that way.
const frag = new URLSearchParams(location.hash.slice(1));
if (frag.get("token")) {
  S.token = frag.get("token");
  sessionStorage.setItem("medsam-token", S.token);
  history.replaceState(null, "", location.pathname + location.search);
}
bind();
window.workbench = { state: S, openImage, accept, loadSlice };
start();
