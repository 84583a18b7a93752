// eligen ui: the page. Each entity is a prompt and its own mask layer (a canvas at the image's size); the server
// checks every layout with the CLI's code, shows what the model's token grid makes of each mask, and renders.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null, width: 64, height: 64, entities: [], active: 0, tool: "brush",
  background: null,  // {ref: "upload:<id>" | "job:<id>", image: HTMLImageElement, name}
  result: null, jobId: null, drag: null, polygon: [], checkTimer: null, checkSeq: 0,
};

// -- the server ---------------------------------------------------------------------------------------------

async function api(method, path, body, raw) {
  const options = { method };
  if (body !== undefined) {
    options.body = raw ? body : JSON.stringify(body);
    options.headers = { "Content-Type": raw ? (body.type || "application/octet-stream") : "application/json" };
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    return { ok: false, data: { errors: [{ message: `the app did not answer (${error.message})` }] } };
  }
  let data = null;
  try { data = await response.json(); } catch (error) { data = { errors: [{ message: response.statusText }] }; }
  return { ok: response.ok, status: response.status, data };
}

function errorText(error) { return error.message; }

function showErrors(errors) {
  const list = $("errors");
  list.replaceChildren(...(errors || []).map((error) => {
    const item = document.createElement("li");
    item.className = "error";
    item.dataset.entity = error.entity ?? "";
    item.dataset.field = error.field ?? "";
    item.textContent = errorText(error);
    return item;
  }));
}

function notice(text) { $("notice").textContent = text || ""; }

// -- layers -------------------------------------------------------------------------------------------------

function blankCanvas(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

function colour(index) {
  const palette = state.info ? state.info.palette : [[230, 25, 75]];
  return palette[index % palette.length];
}

function rgb(index, alpha = 1) { const [r, g, b] = colour(index); return `rgba(${r}, ${g}, ${b}, ${alpha})`; }

function addEntity(prompt = "", layer = null) {
  if (state.entities.length >= state.info.max_entities) return;
  state.entities.push({ prompt, layer: layer || blankCanvas(state.width, state.height), tokens: 0 });
  state.active = state.entities.length - 1;
  changed();
}

function moveEntity(index, by) {
  const to = index + by;
  if (to < 0 || to >= state.entities.length) return;
  const [entity] = state.entities.splice(index, 1);
  state.entities.splice(to, 0, entity);
  state.active = to;
  changed();
}

function removeEntity(index) {
  state.entities.splice(index, 1);
  state.active = Math.max(0, Math.min(state.active, state.entities.length - 1));
  changed();
}

function clearLayer(index) {
  const layer = state.entities[index].layer;
  layer.getContext("2d").clearRect(0, 0, layer.width, layer.height);
  changed();
}

function renderEntities() {
  const list = $("entities");
  list.replaceChildren(...state.entities.map((entity, index) => {
    const item = document.createElement("li");
    item.className = "entity" + (index === state.active ? " active" : "");
    item.dataset.index = index;
    const swatch = document.createElement("span");
    swatch.className = "entity-colour";
    swatch.style.background = rgb(index);
    swatch.title = `entity ${index}`;
    const prompt = document.createElement("input");
    prompt.type = "text";
    prompt.className = "entity-prompt";
    prompt.placeholder = `entity ${index}: what goes here`;
    prompt.value = entity.prompt;
    prompt.addEventListener("input", () => { entity.prompt = prompt.value; scheduleCheck(); });
    prompt.addEventListener("focus", () => select(index));
    const buttons = document.createElement("span");
    buttons.className = "entity-buttons";
    for (const [name, label, title, action] of [
      ["up", "↑", "move up", () => moveEntity(index, -1)],
      ["down", "↓", "move down", () => moveEntity(index, 1)],
      ["clear", "⌫", "clear this layer", () => clearLayer(index)],
      ["remove", "✕", "remove this entity", () => removeEntity(index)],
    ]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = `entity-${name}`;
      button.textContent = label;
      button.title = title;
      button.addEventListener("click", (event) => { event.stopPropagation(); action(); });
      buttons.append(button);
    }
    const tokens = document.createElement("span");
    tokens.className = "entity-tokens";
    tokens.textContent = entity.tokensText || "";
    item.append(swatch, prompt, buttons, tokens);
    item.addEventListener("mousedown", (event) => { if (event.target === item || event.target === swatch) select(index); });
    return item;
  }));
  $("add-entity").disabled = state.entities.length >= state.info.max_entities;
}

function select(index) {
  if (state.active === index) return;
  state.active = index;
  for (const item of $("entities").children) item.classList.toggle("active", Number(item.dataset.index) === index);
  redraw();
}

function changed() { renderEntities(); redraw(); scheduleCheck(); }

// -- the canvas ---------------------------------------------------------------------------------------------

function resizeCanvas(width, height) {
  if (width === state.width && height === state.height) return;
  for (const entity of state.entities) {
    const layer = blankCanvas(width, height);
    const ctx = layer.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(entity.layer, 0, 0, width, height);
    entity.layer = layer;
  }
  state.width = width;
  state.height = height;
  $("canvas").width = width;
  $("canvas").height = height;
  $("width").value = width;
  $("height").value = height;
}

function tinted(layer, index) {
  const scratch = blankCanvas(layer.width, layer.height);
  const ctx = scratch.getContext("2d");
  ctx.drawImage(layer, 0, 0);
  ctx.globalCompositeOperation = "source-in";
  ctx.fillStyle = rgb(index);
  ctx.fillRect(0, 0, scratch.width, scratch.height);
  return scratch;
}

function redraw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (state.background && mode() === "inpaint") {
    ctx.drawImage(state.background.image, 0, 0, canvas.width, canvas.height);
  }
  state.entities.forEach((entity, index) => {
    ctx.globalAlpha = index === state.active ? 0.7 : 0.45;
    ctx.drawImage(tinted(entity.layer, index), 0, 0);
  });
  ctx.globalAlpha = 1;
  const drag = state.drag;
  if (drag && drag.tool === "rect") {
    ctx.strokeStyle = rgb(state.active);
    ctx.lineWidth = Math.max(1, state.width / 256);
    ctx.strokeRect(drag.x0, drag.y0, drag.x - drag.x0, drag.y - drag.y0);
  }
  if (state.polygon.length) {
    ctx.strokeStyle = rgb(state.active);
    ctx.lineWidth = Math.max(1, state.width / 256);
    ctx.beginPath();
    state.polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
  }
}

function imagePoint(event) {
  const box = $("canvas").getBoundingClientRect();
  return [(event.clientX - box.left) * state.width / box.width, (event.clientY - box.top) * state.height / box.height];
}

function activeLayer() { return state.entities[state.active] && state.entities[state.active].layer; }

function strokeTo(x, y) {
  const layer = activeLayer();
  const ctx = layer.getContext("2d");
  ctx.globalCompositeOperation = state.drag.tool === "eraser" ? "destination-out" : "source-over";
  ctx.strokeStyle = "#fff";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.lineWidth = Number($("brush-size").value);
  ctx.beginPath();
  ctx.moveTo(state.drag.x, state.drag.y);
  ctx.lineTo(x, y);
  ctx.stroke();
  ctx.globalCompositeOperation = "source-over";
  state.drag.x = x;
  state.drag.y = y;
}

function onPointerDown(event) {
  if (!activeLayer() || event.button !== 0) return;
  const [x, y] = imagePoint(event);
  if (state.tool === "polygon") {
    state.polygon.push([x, y]);
    redraw();
    return;
  }
  $("canvas").setPointerCapture(event.pointerId);
  state.drag = { tool: state.tool, x0: x, y0: y, x, y };
  if (state.tool !== "rect") strokeTo(x, y);
  redraw();
}

function onPointerMove(event) {
  if (!state.drag) return;
  const [x, y] = imagePoint(event);
  if (state.drag.tool === "rect") { state.drag.x = x; state.drag.y = y; } else strokeTo(x, y);
  redraw();
}

function onPointerUp(event) {
  if (!state.drag) return;
  const drag = state.drag;
  if (drag.tool === "rect") {
    const [x, y] = imagePoint(event);
    const ctx = activeLayer().getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(Math.min(drag.x0, x), Math.min(drag.y0, y), Math.abs(x - drag.x0), Math.abs(y - drag.y0));
  }
  state.drag = null;
  redraw();
  scheduleCheck();
}

function closePolygon() {
  const points = state.polygon;
  state.polygon = [];
  if (points.length >= 3 && activeLayer()) {
    const ctx = activeLayer().getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.closePath();
    ctx.fill();
  }
  redraw();
  scheduleCheck();
}

// -- layouts ------------------------------------------------------------------------------------------------

function maskDataURI(layer) {
  // The layer's alpha, binarised at 128 (the library's rule), as an opaque black-and-white PNG.
  const { width, height } = layer;
  const source = layer.getContext("2d").getImageData(0, 0, width, height).data;
  const scratch = blankCanvas(width, height);
  const ctx = scratch.getContext("2d");
  const out = ctx.createImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    const v = source[4 * i + 3] >= 128 ? 255 : 0;
    out.data[4 * i] = out.data[4 * i + 1] = out.data[4 * i + 2] = v;
    out.data[4 * i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
  return scratch.toDataURL("image/png");
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`cannot load ${url.slice(0, 40)}`));
    image.src = url;
  });
}

async function layerFromMask(url, width, height) {
  const image = await loadImage(url);
  const layer = blankCanvas(width, height);
  const ctx = layer.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image, 0, 0, width, height);
  const pixels = ctx.getImageData(0, 0, width, height);
  for (let i = 0; i < width * height; i++) {
    const on = pixels.data[4 * i] >= 128;
    pixels.data[4 * i] = pixels.data[4 * i + 1] = pixels.data[4 * i + 2] = 255;
    pixels.data[4 * i + 3] = on ? 255 : 0;
  }
  ctx.putImageData(pixels, 0, 0);
  return layer;
}

function number(id, integer) {
  const text = $(id).value.trim();
  const value = integer ? Number.parseInt(text, 10) : Number.parseFloat(text);
  return Number.isFinite(value) ? value : text;  // not a number: sent as typed, the server names the field
}

function layoutPayload() {
  const layout = {
    prompt: $("prompt").value, width: state.width, height: state.height,
    entities: state.entities.map((entity) => ({ prompt: entity.prompt, mask: maskDataURI(entity.layer) })),
  };
  if ($("negative-prompt").value.trim()) layout.negative_prompt = $("negative-prompt").value;
  return layout;
}

function mode() { return $("mode-inpaint").checked ? "inpaint" : "generate"; }

// -- the options: controls made from the schema the server sends (eligen.options), read and set by name --------

function optionLabel(name) {
  const words = name.replaceAll("_", " ").replace(/\bcfg\b/, "CFG");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function optionControl(option) {
  const label = document.createElement("label");
  label.title = option.help;
  const input = document.createElement(option.kind === "choice" ? "select" : "input");
  input.id = option.name.replaceAll("_", "-");
  input.dataset.option = option.name;
  input.dataset.kind = option.kind;
  if (option.kind === "choice") {
    input.replaceChildren(...option.choices.map((name) => new Option(name, name)));
  } else if (option.kind === "bool") {
    input.type = "checkbox";
    label.className = "check";
  } else {
    input.type = option.kind === "text" ? "text" : "number";
    input.step = option.kind === "int" ? "1" : "any";
  }
  setOption(input, option.default);
  if (option.kind === "bool") label.append(input, " ", optionLabel(option.name));
  else label.append(optionLabel(option.name), " ", input);
  return label;
}

function setOption(input, value) {
  if (value === undefined) return;
  if (input.dataset.kind === "bool") input.checked = Boolean(value);
  else input.value = value === null ? "" : value;
}

function readOption(input) {
  const kind = input.dataset.kind;
  if (kind === "bool") return input.checked;
  if (kind === "choice" || kind === "text") return input.value === "" ? null : input.value;
  const text = input.value.trim();
  if (text === "") return null;
  const value = kind === "int" ? Number.parseInt(text, 10) : Number.parseFloat(text);
  return Number.isFinite(value) ? value : text;  // not a number: sent as typed, the server names the field
}

function params() {
  const out = { lora_scale: [...document.querySelectorAll(".lora-scale")].map((input) => Number(input.value)) };
  if (!$("random-seed").checked) out.seed = number("seed", true);
  for (const input of document.querySelectorAll("[data-option]")) {
    if (mode() !== "inpaint" && input.closest("#inpaint-options")) continue;
    out[input.dataset.option] = readOption(input);
  }
  return out;
}

async function applyRecord(record) {
  const { layout, params: given = {}, command } = record;
  $("prompt").value = layout.prompt || "";
  $("negative-prompt").value = layout.negative_prompt || "";
  state.entities = [];
  state.polygon = [];
  resizeCanvas(layout.width, layout.height);
  for (const entity of layout.entities) {
    state.entities.push({ prompt: entity.prompt, layer: await layerFromMask(entity.mask, layout.width, layout.height) });
  }
  state.active = 0;
  const seed = given.seed ?? layout.seed;
  $("random-seed").checked = seed === undefined || seed === null;
  $("seed").disabled = $("random-seed").checked;
  if (!$("random-seed").checked) $("seed").value = seed;
  for (const input of document.querySelectorAll("[data-option]")) {
    const value = given[input.dataset.option];
    if (value !== undefined && value !== null) setOption(input, value);
  }
  document.querySelectorAll(".lora-scale").forEach((input, i) => {
    if (given.lora_scale && given.lora_scale[i] !== undefined) input.value = given.lora_scale[i];
  });
  if (command === "inpaint") {
    $("mode-inpaint").checked = true;
    notice("this layout was inpainted: upload its input image again to repaint it");
  }
  modeChanged();
  changed();
}

// -- the live preview: what the model sees ------------------------------------------------------------------

function scheduleCheck() {
  clearTimeout(state.checkTimer);
  state.checkTimer = setTimeout(check, 200);
}

async function check() {
  const seq = ++state.checkSeq;
  const { data } = await api("POST", "/api/check", { layout: layoutPayload() });
  if (seq !== state.checkSeq) return;  // a newer check is on its way
  showErrors(data.errors);
  drawGrid(data.grid);
  document.body.dataset.checked = String(seq);
}

function drawGrid(grid) {
  const canvas = $("token-preview");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!grid) return;
  const cell = Math.max(2, Math.floor(256 / Math.max(grid.rows, grid.cols)));
  canvas.width = grid.cols * cell;
  canvas.height = grid.rows * cell;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  grid.covers.forEach((cover, index) => {
    ctx.fillStyle = rgb(index, 0.55);
    cover.forEach((on, token) => {
      if (on) ctx.fillRect((token % grid.cols) * cell, Math.floor(token / grid.cols) * cell, cell, cell);
    });
    const count = cover.reduce((a, b) => a + b, 0);
    const entity = state.entities[index];
    if (entity) entity.tokensText = `${count} of ${grid.rows}×${grid.cols} tokens (${grid.token_pixels} px each)`;
  });
  if (cell >= 4) {
    ctx.strokeStyle = "rgba(0, 0, 0, 0.15)";
    ctx.lineWidth = 1;
    for (let c = 0; c <= grid.cols; c++) { ctx.beginPath(); ctx.moveTo(c * cell + 0.5, 0); ctx.lineTo(c * cell + 0.5, canvas.height); ctx.stroke(); }
    for (let r = 0; r <= grid.rows; r++) { ctx.beginPath(); ctx.moveTo(0, r * cell + 0.5); ctx.lineTo(canvas.width, r * cell + 0.5); ctx.stroke(); }
  }
  document.querySelectorAll(".entity-tokens").forEach((span, i) => {
    span.textContent = state.entities[i] ? state.entities[i].tokensText || "" : "";
  });
}

// -- generation ---------------------------------------------------------------------------------------------

async function generate() {
  notice("");
  const body = { layout: layoutPayload(), params: params(), mode: mode() };
  if (mode() === "inpaint") body.background = state.background ? state.background.ref : null;
  $("generate").disabled = true;
  const { ok, data } = await api("POST", "/api/jobs", body);
  if (!ok) {
    showErrors(data.errors);
    $("generate").disabled = false;
    return;
  }
  state.jobId = data.id;
  $("status").textContent = `queued (seed ${data.seed})`;
  poll(data.id);
}

async function poll(id) {
  const { ok, data } = await api("GET", `/api/jobs/${id}`);
  if (!ok) {
    notice(data.errors.map(errorText).join("; "));
    $("generate").disabled = false;
    return;
  }
  const progress = $("progress");
  if (data.state === "queued") {
    $("status").textContent = data.position ? `waiting: queue position ${data.position} (${data.position} ahead)`
                                            : "starting";
    progress.hidden = true;
  } else if (data.state === "running") {
    progress.hidden = false;
    progress.max = data.steps;
    progress.value = data.step;
    $("status").textContent = `generating: step ${data.step} of ${data.steps}`;
  } else if (data.state === "error") {
    progress.hidden = true;
    $("status").textContent = "failed";
    showErrors([data.error]);
    $("generate").disabled = false;
    return;
  } else if (data.state === "done") {
    progress.hidden = true;
    showResult(data.result);
    $("generate").disabled = false;
    return;
  }
  setTimeout(() => poll(id), 250);
}

function showResult(result) {
  state.result = result;
  const stamp = `?t=${Date.now()}`;
  for (const [id, url] of [["result-image", result.image], ["result-overlay", result.overlay]]) {
    $(id).src = url + stamp;
    $(id).hidden = false;
  }
  for (const [id, url, name] of [["download-png", result.image, result.name],
                                 ["download-layout", result.layout, result.layout_name]]) {
    $(id).href = url;
    $(id).download = name;
    $(id).classList.remove("disabled");
  }
  $("use-background").disabled = false;
  $("seed").value = result.seed;
  $("status").textContent = `done: seed ${result.seed}, ${result.width}×${result.height}`;
  document.body.dataset.result = state.jobId;
}

async function setBackground(ref, url, name) {
  const image = await loadImage(url);
  state.background = { ref, image, name };
  resizeCanvas(image.naturalWidth, image.naturalHeight);
  $("background-status").textContent = `${name}: ${image.naturalWidth}×${image.naturalHeight}`;
  $("mode-inpaint").checked = true;
  modeChanged();
  changed();
}

function fileBody(file) {
  // A file as the server takes it: its bytes as a data URI inside JSON (every request that changes state is JSON).
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, data: reader.result });
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function upload(file) {
  notice("");
  $("background-status").textContent = "uploading...";
  const { ok, data } = await api("POST", "/api/upload", await fileBody(file));
  if (!ok) {
    $("background-status").textContent = state.background ? state.background.name : "no image yet";
    notice(data.errors.map(errorText).join("; "));
    return;
  }
  await setBackground(data.id, data.url, file.name);
}

async function loadFile(file) {
  notice("");
  const { ok, data } = await api("POST", "/api/load", await fileBody(file));
  if (!ok) {
    notice(data.errors.map(errorText).join("; "));
    return;
  }
  await applyRecord(data);
  document.body.dataset.loaded = String(Date.now());
}

async function plan() {
  notice("");
  $("plan-button").disabled = true;
  const { ok, data } = await api("POST", "/api/plan", { text: $("plan-text").value, width: state.width, height: state.height });
  $("plan-button").disabled = false;
  if (!ok) {
    notice(data.errors.map(errorText).join("; "));
    return;
  }
  await applyRecord({ layout: data.layout, params: {} });
}

function modeChanged() {
  const inpaint = mode() === "inpaint";
  $("inpaint-panel").hidden = !inpaint;
  $("width").disabled = $("height").disabled = inpaint && !!state.background;
  redraw();
}

function sizeChanged() {
  const width = Number.parseInt($("width").value, 10);
  const height = Number.parseInt($("height").value, 10);
  if (width > 0 && height > 0 && width * height <= state.info.max_pixels) {
    resizeCanvas(width, height);
    changed();
  } else {
    notice(`choose a size between 16 and ${state.info.max_pixels} pixels in all`);
  }
}

// -- start --------------------------------------------------------------------------------------------------

async function start() {
  const { ok, data } = await api("GET", "/api/info");
  if (!ok) { notice("the app's server did not answer"); return; }
  state.info = data;
  $("model-name").textContent = `${data.model} (${data.family})`;
  const [width, height] = data.native_size;
  state.width = state.height = 0;
  resizeCanvas(width, height);
  for (const id of ["width", "height"]) $(id).step = data.token_pixels;
  $("sampling-options").replaceChildren(...data.options.filter((o) => o.group !== "InpaintOptions").map(optionControl));
  $("inpaint-options").replaceChildren(...data.options.filter((o) => o.group === "InpaintOptions").map(optionControl));
  $("lora-scales").replaceChildren(...data.loras.map((name, i) => {
    const label = document.createElement("label");
    label.textContent = `LoRA ${name} scale `;
    const input = document.createElement("input");
    input.type = "number";
    input.step = "0.1";
    input.value = "1";
    input.className = "lora-scale";
    input.dataset.index = i;
    label.append(input);
    return label;
  }));
  $("plan-panel").hidden = !data.plan;
  const size = Math.max(1, Math.round(Math.max(width, height) / 8));
  $("brush-size").max = Math.max(64, Math.round(Math.max(width, height) / 2));
  $("brush-size").value = size;
  $("brush-size-value").textContent = `${size} px`;

  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  canvas.addEventListener("dblclick", closePolygon);
  document.addEventListener("keydown", (event) => {
    if (!state.polygon.length) return;
    if (event.key === "Enter") { event.preventDefault(); closePolygon(); }
    if (event.key === "Escape") { state.polygon = []; redraw(); }
  });
  document.querySelectorAll("input[name=tool]").forEach((input) => input.addEventListener("change", () => {
    state.tool = input.value;
    state.polygon = [];
    redraw();
  }));
  $("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = `${$("brush-size").value} px`; });
  $("add-entity").addEventListener("click", () => addEntity());
  $("prompt").addEventListener("input", scheduleCheck);
  $("negative-prompt").addEventListener("input", scheduleCheck);
  $("width").addEventListener("change", sizeChanged);
  $("height").addEventListener("change", sizeChanged);
  $("random-seed").addEventListener("change", () => { $("seed").disabled = $("random-seed").checked; });
  document.querySelectorAll("input[name=mode]").forEach((input) => input.addEventListener("change", modeChanged));
  $("generate").addEventListener("click", generate);
  $("upload-image").addEventListener("change", (event) => { if (event.target.files[0]) upload(event.target.files[0]); event.target.value = ""; });
  $("load-file").addEventListener("change", (event) => { if (event.target.files[0]) loadFile(event.target.files[0]); event.target.value = ""; });
  $("plan-button").addEventListener("click", plan);
  $("use-background").addEventListener("click", () => {
    if (state.result) setBackground(`job:${state.jobId}`, state.result.image, state.result.name);
  });
  addEntity();
  document.body.dataset.ready = "1";
}

start();
