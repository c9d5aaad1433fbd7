// sam-jax annotate: the browser side. The server embeds each image once; every click here is
// one /api/predict call (one decode) fed with the previous candidate's logits (mask_token).
"use strict";

const $ = (id) => document.getElementById(id);
const imageCanvas = $("image-canvas");
const overlay = $("overlay");
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                "#bcf60c", "#008080", "#9a6324", "#800000", "#808000", "#000075", "#808080"];

const state = {
  images: [], name: null, width: 0, height: 0, img: null, objects: [],
  // the object being annotated; every change pushes a copy on `history`
  cur: blank(), history: [], future: [],
  tool: "prompt", brush: 12, opened: 0, drag: null,
};

function blank() {
  return { points: [], labels: [], box: null, candidates: [], scores: [], tokens: [],
           chosen: 0, mask: null };  // mask: a canvas holding the chosen (maybe edited) mask
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot load " + src));
    img.src = src;
  });
}

async function maskCanvas(dataUrl) {
  const img = await loadImage(dataUrl);
  const c = document.createElement("canvas");
  c.width = state.width; c.height = state.height;
  c.getContext("2d").drawImage(img, 0, 0);
  return c;
}

function copyCanvas(src) {
  const c = document.createElement("canvas");
  c.width = src.width; c.height = src.height;
  c.getContext("2d").drawImage(src, 0, 0);
  return c;
}

// a white-on-black mask canvas drawn in `color` with some transparency
function drawMask(ctx, mask, color, alpha) {
  const tmp = document.createElement("canvas");
  tmp.width = mask.width; tmp.height = mask.height;
  const t = tmp.getContext("2d");
  t.drawImage(mask, 0, 0);
  const px = t.getImageData(0, 0, tmp.width, tmp.height);
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
  for (let i = 0; i < px.data.length; i += 4) {
    const on = px.data[i] >= 128;
    px.data[i] = r; px.data[i + 1] = g; px.data[i + 2] = b;
    px.data[i + 3] = on ? Math.round(255 * alpha) : 0;
  }
  t.putImageData(px, 0, 0);
  ctx.drawImage(tmp, 0, 0);
}

function redraw() {
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  state.objects.forEach((o, i) => o.canvas && drawMask(ctx, o.canvas, COLORS[i % COLORS.length], 0.45));
  if (state.cur.mask) drawMask(ctx, state.cur.mask, "#ffff00", 0.5);
  if (state.cur.box) {
    const [x0, y0, x1, y1] = state.cur.box;
    ctx.strokeStyle = "#00ff00"; ctx.lineWidth = 2; ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  if (state.drag && state.drag.moved && state.tool === "prompt") {
    const d = state.drag;
    ctx.strokeStyle = "#00ff00"; ctx.setLineDash([4, 4]);
    ctx.strokeRect(d.x0, d.y0, d.x - d.x0, d.y - d.y0); ctx.setLineDash([]);
  }
  state.cur.points.forEach(([x, y], i) => {
    ctx.beginPath(); ctx.arc(x, y, 6, 0, 2 * Math.PI);
    ctx.fillStyle = state.cur.labels[i] ? "#22dd22" : "#ee2222"; ctx.fill();
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.stroke();
  });
  const n = state.cur.candidates.length;
  if (n) status(`candidate ${state.cur.chosen + 1} of ${n}: predicted IoU ` +
                `${state.cur.scores[state.cur.chosen].toFixed(3)}`);
}

function snapshot() {
  const c = state.cur;
  return { ...c, points: c.points.map((p) => [...p]), labels: [...c.labels],
           box: c.box && [...c.box], mask: c.mask && copyCanvas(c.mask) };
}

function pushHistory() { state.history.push(snapshot()); state.future = []; }

async function predict() {
  const c = state.cur;
  if (!c.points.length && !c.box) { c.candidates = []; c.mask = null; redraw(); return; }
  const multimask = c.points.length === 1 && !c.box;  // SAM: ambiguous prompt, 3 masks
  const token = c.tokens.length ? c.tokens[c.chosen] : null;
  const t0 = performance.now();
  try {
    const out = await api("/api/predict", { name: state.name, points: c.points,
      labels: c.labels, box: c.box, mask_token: token, multimask });
    c.candidates = await Promise.all(out.masks.map(maskCanvas));
    c.scores = out.scores; c.tokens = out.tokens;
    c.chosen = out.scores.indexOf(Math.max(...out.scores));
    c.mask = copyCanvas(c.candidates[c.chosen]);
    window.lastClickMs = performance.now() - t0;  // read by the latency benchmark
    redraw();
  } catch (e) {
    // the prompt that failed is taken back, so the state stays one the server accepted
    state.cur = state.history.pop() || blank();
    redraw(); status(e.message, true);
  }
}

function canvasXY(event) {
  const r = overlay.getBoundingClientRect();
  return [Math.round((event.clientX - r.left) * overlay.width / r.width),
          Math.round((event.clientY - r.top) * overlay.height / r.height)];
}

function paint(x, y) {
  if (!state.cur.mask) {
    state.cur.mask = document.createElement("canvas");
    state.cur.mask.width = state.width; state.cur.mask.height = state.height;
    const m = state.cur.mask.getContext("2d");
    m.fillStyle = "#000"; m.fillRect(0, 0, state.width, state.height);
  }
  const m = state.cur.mask.getContext("2d");
  m.fillStyle = state.tool === "brush" ? "#fff" : "#000";
  m.beginPath(); m.arc(x, y, state.brush, 0, 2 * Math.PI); m.fill();
  redraw();
}

overlay.addEventListener("contextmenu", (e) => e.preventDefault());
overlay.addEventListener("mousedown", (e) => {
  if (!state.name) return;
  overlay.focus();
  const [x, y] = canvasXY(e);
  state.drag = { x0: x, y0: y, x, y, moved: false, negative: e.button === 2 || e.shiftKey };
  if (state.tool !== "prompt") { pushHistory(); paint(x, y); }
});
overlay.addEventListener("mousemove", (e) => {
  if (!state.drag) return;
  const [x, y] = canvasXY(e);
  const d = state.drag;
  d.x = x; d.y = y;
  if (Math.abs(x - d.x0) + Math.abs(y - d.y0) > 6) d.moved = true;
  if (state.tool !== "prompt") paint(x, y); else if (d.moved) redraw();
});
overlay.addEventListener("mouseup", async (e) => {
  const d = state.drag;
  state.drag = null;
  if (!d || state.tool !== "prompt") return;
  pushHistory();
  if (d.moved) {
    state.cur.box = [Math.min(d.x0, d.x), Math.min(d.y0, d.y),
                     Math.max(d.x0, d.x), Math.max(d.y0, d.y)];
  } else {
    state.cur.points.push([d.x0, d.y0]);
    state.cur.labels.push(d.negative ? 0 : 1);
  }
  await predict();
});

function setTool(tool) {
  state.tool = state.tool === tool ? "prompt" : tool;
  $("brush").classList.toggle("active", state.tool === "brush");
  $("eraser").classList.toggle("active", state.tool === "eraser");
}

function cycle() {
  const c = state.cur;
  if (c.candidates.length < 2) return;
  pushHistory();
  c.chosen = (c.chosen + 1) % c.candidates.length;
  c.mask = copyCanvas(c.candidates[c.chosen]);
  redraw();
}

function undo() {
  if (!state.history.length) return;
  state.future.push(snapshot()); state.cur = state.history.pop(); redraw();
}

function redo() {
  if (!state.future.length) return;
  state.history.push(snapshot()); state.cur = state.future.pop(); redraw();
}

function clearCurrent() { pushHistory(); state.cur = blank(); redraw(); status(""); }

async function accept() {
  const c = state.cur;
  if (!c.mask) { status("nothing to accept: click the object first", true); return; }
  const seconds = (performance.now() - state.opened) / 1000;
  try {
    const ann = await api("/api/accept", { name: state.name, mask: c.mask.toDataURL("image/png"),
      prompts: { points: c.points, labels: c.labels, box: c.box },
      predicted_iou: c.scores.length ? c.scores[c.chosen] : 0, label: $("label").value || null,
      seconds });
    state.opened = performance.now();
    state.cur = blank(); state.history = []; state.future = [];
    $("label").value = "";
    await refreshObjects();
    await refreshList();
    status(`accepted object ${ann.object_id.slice(0, 8)} (${ann.area} px)`);
  } catch (e) { status(e.message, true); }
}

async function refreshObjects() {
  const out = await api("/api/objects/" + encodeURIComponent(state.name));
  state.objects = await Promise.all(out.objects.map(async (o) => ({ ...o, canvas: await maskCanvas(o.mask) })));
  const list = $("objects");
  list.innerHTML = "";
  state.objects.forEach((o, i) => {
    const li = document.createElement("li");
    li.style.background = COLORS[i % COLORS.length];
    li.textContent = `${o.label || "object"}${o.source === "automatic" ? " (auto)" : ""}`;
    const remove = document.createElement("button");
    remove.textContent = "×"; remove.title = "remove";
    remove.onclick = async () => {
      await api("/api/remove", { name: state.name, object_id: o.object_id });
      await refreshObjects(); await refreshList();
    };
    li.appendChild(remove); list.appendChild(li);
  });
  redraw();
}

async function refreshList() {
  const out = await api("/api/images");
  state.images = out.images;
  const done = out.images.filter((i) => i.done).length;
  $("progress").textContent = `${done} done / ${out.images.length - done} to do · ${out.mode}`;
  const list = $("images");
  list.innerHTML = "";
  out.images.forEach((img) => {
    const li = document.createElement("li");
    li.textContent = `${img.name} (${img.objects})`;
    li.dataset.name = img.name;
    li.className = (img.done ? "done " : "") + (img.name === state.name ? "current" : "");
    li.onclick = () => openImage(img.name);
    list.appendChild(li);
  });
}

async function openImage(name) {
  status(`opening ${name} ...`);
  try {
    const info = await api("/api/open", { name });
    state.name = name; state.width = info.width; state.height = info.height;
    state.img = await loadImage("/api/image/" + encodeURIComponent(name));
    for (const c of [imageCanvas, overlay]) { c.width = info.width; c.height = info.height; }
    imageCanvas.getContext("2d").drawImage(state.img, 0, 0);
    state.cur = blank(); state.history = []; state.future = [];
    state.opened = performance.now();
    $("image-name").textContent = name;
    await refreshObjects();
    await refreshList();
    status(`${name}: ${info.objects.length} objects` + (info.prefilled ? " (filled in automatically)" : ""));
    overlay.focus();
  } catch (e) { status(e.message, true); }
}

function step(delta) {
  if (!state.images.length) return;
  const i = state.images.findIndex((x) => x.name === state.name);
  openImage(state.images[(i + delta + state.images.length) % state.images.length].name);
}

async function markDone() {
  const seconds = (performance.now() - state.opened) / 1000;
  await api("/api/done", { name: state.name, done: true, seconds });
  state.opened = performance.now();
  await refreshList();
}

document.addEventListener("keydown", (e) => {
  if (e.target === $("label")) { if (e.key === "Enter") { e.preventDefault(); accept(); } return; }
  const k = e.key;
  if ((e.ctrlKey || e.metaKey) && (k === "z" || k === "Z")) { e.preventDefault(); e.shiftKey ? redo() : undo(); }
  else if ((e.ctrlKey || e.metaKey) && (k === "y" || k === "Y")) { e.preventDefault(); redo(); }
  else if (k === "Enter") { e.preventDefault(); accept(); }
  else if (k === "Tab") { e.preventDefault(); cycle(); }
  else if (k === "Escape") clearCurrent();
  else if (k === "b" || k === "B") setTool("brush");
  else if (k === "e" || k === "E") setTool("eraser");
  else if (k === "[") state.brush = Math.max(1, state.brush - 2);
  else if (k === "]") state.brush += 2;
  else if (k === "n" || k === "N") step(1);
  else if (k === "p" || k === "P") step(-1);
  else if (k === "d" || k === "D") markDone();
});

$("accept").onclick = accept; $("cycle").onclick = cycle; $("undo").onclick = undo;
$("redo").onclick = redo; $("clear").onclick = clearCurrent; $("next").onclick = () => step(1);
$("brush").onclick = () => setTool("brush"); $("eraser").onclick = () => setTool("eraser");
$("done").onclick = markDone;

(async () => {
  await refreshList();
  const todo = state.images.find((i) => !i.done) || state.images[0];
  if (todo) openImage(todo.name);  // resume where the annotator stopped
})();
