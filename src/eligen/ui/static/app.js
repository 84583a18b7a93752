// eligen ui: the page. Each entity is a prompt and its own mask layer (a canvas at the image's size) with a colour
// of its own; the server checks every layout with the CLI's code, shows what the model's token grid makes of each
// mask, and renders. Every change to the masks can be undone; the page keeps its layout across reloads.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE_KEY = "eligen.page.v1";
const JOB_KEY = "eligen.job";
const START_KEY = "eligen.start-hidden";
const MAX_SIDE = 16384;  // what a browser canvas holds on a side
const MAX_ASPECT = 8;    // a longer side beyond this many times the shorter is a strip nobody can draw on
const UNDO_LIMIT = 100;
const state = {
  info: null, width: 64, height: 64, entities: [], active: 0, tool: "brush", zoom: 1, nextId: 1,
  background: null,  // the image to inpaint or edit: {ref: "upload:<id>" | "job:<id>", image, name, url}
  guide: null,       // a picture to draw over, in this page only: {image, name}
  reference: null,   // the whole picture's reference image (IP-Adapter), a data URI
  control: null,     // the whole picture's control image (ControlNet), a data URI
  shown: null, running: null, attempted: false, undo: [], redo: [],
  drag: null, pan: null, space: false, polygon: [], checkTimer: null, checkSeq: 0, saveTimer: null, lastErrors: [],
};

// -- the server ---------------------------------------------------------------------------------------------

async function api(method, path, body) {
  const options = { method };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    return { ok: false, status: 0, data: { errors: [{ message: `the app did not answer (${error.message})` }] } };
  }
  let data = null;
  try { data = await response.json(); } catch (error) { data = { errors: [{ message: response.statusText }] }; }
  return { ok: response.ok, status: response.status, data };
}

function showErrors(errors) {
  state.lastErrors = errors || [];
  $("errors").replaceChildren(...state.lastErrors.map((error) => {
    const item = document.createElement("li");
    const todo = error.todo && !state.attempted;
    item.className = todo ? "todo" : "error";
    item.dataset.entity = error.entity ?? "";
    item.dataset.field = error.field ?? "";
    item.textContent = todo ? `To do: ${error.message}` : error.message;
    return item;
  }));
}

function notice(text) { $("notice").textContent = text || ""; }

function refusal(data) { return (data.errors || []).map((error) => error.message).join("; "); }

// -- entities and their colours -----------------------------------------------------------------------------

function blankCanvas(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

function copyCanvas(source, width = source.width, height = source.height) {
  // NEAREST: a mask stays binary, and the same size copies every pixel as it is.
  const canvas = blankCanvas(width, height);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(source, 0, 0, width, height);
  return canvas;
}

function palette() { return state.info ? state.info.palette : [[230, 25, 75]]; }

function rgb(colour, alpha = 1) {
  const [r, g, b] = palette()[colour % palette().length];
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}

function freeColour() {
  // A new entity takes the first colour no entity has; an entity keeps its colour wherever it moves.
  const used = new Set(state.entities.map((entity) => entity.colour));
  for (let i = 0; i < palette().length; i++) if (!used.has(i)) return i;
  return state.entities.length % palette().length;
}

function makeEntity(prompt = "", layer = null, colour = null) {
  const canvas = layer || blankCanvas(state.width, state.height);
  return { id: state.nextId++, colour: colour ?? freeColour(), prompt, layer: canvas, origin: canvas, image: null,
           imageScale: 1, lora: null, loraScale: 1, control: null, controlScale: 1 };
}

function addEntity(prompt = "", layer = null) {
  if (state.entities.length >= state.info.max_entities) return null;
  remember();
  const entity = makeEntity(prompt, layer);
  state.entities.push(entity);
  state.active = state.entities.length - 1;
  changed();
  return entity;
}

function moveEntity(index, by) {
  const to = index + by;
  if (to < 0 || to >= state.entities.length) return;
  remember();
  const [entity] = state.entities.splice(index, 1);
  state.entities.splice(to, 0, entity);
  state.active = to;
  changed();
}

function removeEntity(index) {
  if (!state.entities[index]) return;
  remember();
  state.entities.splice(index, 1);
  state.active = Math.max(0, Math.min(state.active, state.entities.length - 1));
  changed();
}

function clearLayer(index) {
  const entity = state.entities[index];
  if (!entity) return;
  remember();
  entity.layer = entity.origin = blankCanvas(state.width, state.height);
  changed();
}

function select(index) {
  if (state.active === index) return;
  state.active = index;
  for (const item of $("entities").children) item.classList.toggle("active", Number(item.dataset.index) === index);
  redraw();
}

function changed() { renderEntities(); redraw(); scheduleCheck(); saveSoon(); }

// -- undo and redo: snapshots share every canvas until an edit copies the one it changes ----------------------

function snapshot() {
  return { width: state.width, height: state.height, active: state.active,
           entities: state.entities.map((entity) => ({ ...entity })) };
}

function remember() {
  state.undo.push(snapshot());
  if (state.undo.length > UNDO_LIMIT) state.undo.shift();
  state.redo = [];
  undoButtons();
}

function restore(saved) {
  const prompts = new Map(state.entities.map((entity) => [entity.id, entity.prompt]));
  state.entities = saved.entities.map((entity) => ({ ...entity, prompt: prompts.get(entity.id) ?? entity.prompt }));
  setCanvasSize(saved.width, saved.height);
  state.active = Math.min(saved.active, Math.max(0, state.entities.length - 1));
  changed();
}

function undo() {
  if (!state.undo.length) return;
  state.redo.push(snapshot());
  restore(state.undo.pop());
  undoButtons();
}

function redo() {
  if (!state.redo.length) return;
  state.undo.push(snapshot());
  restore(state.redo.pop());
  undoButtons();
}

function undoButtons() {
  $("undo").disabled = !state.undo.length;
  $("redo").disabled = !state.redo.length;
}

function editableLayer() {
  // The active entity's layer, copied first so that the snapshots keep the one before the edit.
  const entity = state.entities[state.active];
  if (!entity) return null;
  entity.layer = entity.origin = copyCanvas(entity.layer);
  return entity.layer;
}

// -- the entity list ----------------------------------------------------------------------------------------

function entityButton(name, label, text, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `entity-${name}`;
  button.textContent = label;
  button.title = text;
  button.setAttribute("aria-label", text);
  button.addEventListener("click", (event) => { event.stopPropagation(); action(); });
  return button;
}

function fileButton(text, label, accept, onFile) {
  const wrapper = document.createElement("label");
  wrapper.className = "file-button small";
  wrapper.append(text);
  const input = document.createElement("input");
  input.type = "file";
  input.accept = accept;
  input.setAttribute("aria-label", label);
  input.addEventListener("change", () => { if (input.files[0]) onFile(input.files[0]); input.value = ""; });
  wrapper.append(input);
  return wrapper;
}

function entityExtras(entity, index) {
  const extra = document.createElement("div");
  extra.className = "entity-extra";
  extra.append(fileButton("Mask image", `Upload a mask image for entity ${index + 1}`, "image/*",
                          (file) => maskFromFile(entity, file)));
  if (state.info.entity_loras.length) extra.append(...loraChoice(entity, index));
  if (state.info.controlnet) extra.append(...controlChoice(entity, index));
  if (!state.info.ip_adapter) return extra;
  extra.append(fileButton("Reference image", `Reference image for entity ${index + 1}`, "image/*", async (file) => {
    const uri = await referenceFromFile(file);
    if (uri) { entity.image = uri; changed(); }
  }));
  if (entity.image) {
    const thumb = document.createElement("img");
    thumb.src = entity.image;
    thumb.alt = `reference image of entity ${index + 1}`;
    const scale = document.createElement("input");
    scale.type = "number";
    scale.step = "0.1";
    scale.min = "0";
    scale.value = entity.imageScale;
    scale.setAttribute("aria-label", `Reference image scale of entity ${index + 1}`);
    scale.addEventListener("input", () => { entity.imageScale = Number(scale.value); scheduleCheck(); saveSoon(); });
    extra.append(thumb, scale, entityButton("reference-remove", "✕", `Remove the reference image of entity ${index + 1}`,
                                            () => { entity.image = null; changed(); }));
  }
  return extra;
}

function scaleInput(value, label, onValue) {
  const scale = document.createElement("input");
  scale.type = "number";
  scale.step = "0.1";
  scale.min = "0";
  scale.value = value;
  scale.setAttribute("aria-label", label);
  scale.title = label;
  scale.addEventListener("input", () => { onValue(Number(scale.value)); scheduleCheck(); saveSoon(); });
  return scale;
}

function loraChoice(entity, index) {
  // one of the LoRAs the operator offers (by name; the server holds the files), or none, and its scale
  const n = index + 1;
  const select = document.createElement("select");
  select.className = "entity-lora";
  select.setAttribute("aria-label", `LoRA of entity ${n}`);
  select.replaceChildren(new Option("no LoRA", ""), ...state.info.entity_loras.map((name) => new Option(`LoRA ${name}`, name)));
  select.value = entity.lora || "";
  select.addEventListener("change", () => { entity.lora = select.value || null; changed(); });
  if (!entity.lora) return [select];
  const scale = scaleInput(entity.loraScale, `LoRA scale of entity ${n}`, (value) => { entity.loraScale = value; });
  scale.className = "entity-lora-scale";
  return [select, scale];
}

function controlChoice(entity, index) {
  // a control image (ControlNet) for this entity's region, and its scale
  const n = index + 1;
  const parts = [fileButton("Control image", `Control image for entity ${n}`, "image/*", async (file) => {
    const uri = await referenceFromFile(file);
    if (uri) { entity.control = uri; changed(); }
  })];
  if (!entity.control) return parts;
  const thumb = document.createElement("img");
  thumb.src = entity.control;
  thumb.alt = `control image of entity ${n}`;
  thumb.className = "entity-control";
  const scale = scaleInput(entity.controlScale, `Control scale of entity ${n}`, (value) => { entity.controlScale = value; });
  scale.className = "entity-control-scale";
  return [...parts, thumb, scale, entityButton("control-remove", "✕", `Remove the control image of entity ${n}`,
                                               () => { entity.control = null; changed(); })];
}

function entityItem(entity, index) {
  const item = document.createElement("li");
  item.className = "entity" + (index === state.active ? " active" : "");
  item.dataset.index = index;
  item.dataset.id = entity.id;
  const swatch = document.createElement("span");
  swatch.className = "entity-colour";
  swatch.style.background = rgb(entity.colour);
  swatch.title = `entity ${index + 1}`;
  const prompt = document.createElement("input");
  prompt.type = "text";
  prompt.className = "entity-prompt";
  prompt.placeholder = `Entity ${index + 1}: what goes here`;
  prompt.setAttribute("aria-label", `Entity ${index + 1} prompt`);
  prompt.value = entity.prompt;
  prompt.addEventListener("input", () => { entity.prompt = prompt.value; scheduleCheck(); saveSoon(); });
  prompt.addEventListener("focus", () => select(index));
  const buttons = document.createElement("span");
  buttons.className = "entity-buttons";
  const n = index + 1;
  buttons.append(entityButton("up", "↑", `Move entity ${n} up`, () => moveEntity(index, -1)),
                 entityButton("down", "↓", `Move entity ${n} down`, () => moveEntity(index, 1)),
                 entityButton("clear", "⌫", `Clear the mask of entity ${n}`, () => clearLayer(index)),
                 entityButton("remove", "✕", `Remove entity ${n}`, () => removeEntity(index)));
  const tokens = document.createElement("span");
  tokens.className = "entity-tokens";
  tokens.textContent = entity.tokensText || "";
  item.append(swatch, prompt, buttons, entityExtras(entity, index), tokens);
  item.addEventListener("mousedown", (event) => { if (event.target === item || event.target === swatch) select(index); });
  return item;
}

function renderEntities() {
  const focused = document.activeElement;
  const focusKey = focused && focused.closest && focused.closest(".entity")
    ? [focused.closest(".entity").dataset.id, focused.className] : null;
  $("entities").replaceChildren(...state.entities.map(entityItem));
  $("add-entity").disabled = state.entities.length >= state.info.max_entities;
  if (focusKey) {  // keep the keyboard where it was (a moved entity keeps the focus on its button)
    const again = document.querySelector(`.entity[data-id="${focusKey[0]}"] .${focusKey[1].split(" ")[0]}`);
    if (again) again.focus();
  }
}

// -- the canvas: size, zoom, drawing -----------------------------------------------------------------------

function setCanvasSize(width, height) {
  state.width = width;
  state.height = height;
  for (const entity of state.entities) {
    // Each mask is resampled from the layer it was last drawn on, so a size and back again loses nothing.
    if (entity.layer.width !== width || entity.layer.height !== height) entity.layer = copyCanvas(entity.origin, width, height);
  }
  $("canvas").width = width;
  $("canvas").height = height;
  $("width").value = width;
  $("height").value = height;
  layoutCanvas();
}

function sizeProblem(width, height) {
  const info = state.info;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < info.token_pixels || height < info.token_pixels) {
    return `Width and height are whole numbers of pixels, at least ${info.token_pixels}`;
  }
  if (width > MAX_SIDE || height > MAX_SIDE) return `Width and height are at most ${MAX_SIDE} pixels (what a browser canvas holds)`;
  if (width * height > info.max_pixels) {
    return `${width}×${height} is ${width * height} pixels, above this app's limit of ${info.max_pixels}; choose a smaller size`;
  }
  if (Math.max(width, height) > MAX_ASPECT * Math.min(width, height)) {
    return `${width}×${height} would be a thin strip: keep the longer side within ${MAX_ASPECT} times the shorter`;
  }
  return null;
}

function sizeChanged() {
  const width = Number($("width").value);
  const height = Number($("height").value);
  if (width === state.width && height === state.height) return;
  const problem = sizeProblem(width, height);
  if (problem) {
    notice(problem);  // nothing changes: the masks stay as they are
    $("width").value = state.width;
    $("height").value = state.height;
    return;
  }
  notice("");
  remember();
  scaleBrush(Math.max(width, height) / Math.max(state.width, state.height));
  setCanvasSize(width, height);
  changed();
}

function layoutCanvas() {
  const wrap = $("canvas-wrap");
  const fit = Math.min((wrap.clientWidth - 2) / state.width, (wrap.clientHeight - 2) / state.height) || 1;
  const scale = fit * state.zoom;
  const stage = $("canvas-stage");
  stage.style.width = `${state.width * scale}px`;
  stage.style.height = `${state.height * scale}px`;
  $("canvas").style.width = `${state.width * scale}px`;
  $("canvas").style.height = `${state.height * scale}px`;
  $("zoom-value").textContent = `${Math.round(state.zoom * 100)}%`;
}

function zoomBy(factor) {
  state.zoom = Math.min(16, Math.max(0.25, state.zoom * factor));
  layoutCanvas();
}

function tinted(layer, colour) {
  const scratch = blankCanvas(layer.width, layer.height);
  const ctx = scratch.getContext("2d");
  ctx.drawImage(layer, 0, 0);
  ctx.globalCompositeOperation = "source-in";
  ctx.fillStyle = rgb(colour);
  ctx.fillRect(0, 0, scratch.width, scratch.height);
  return scratch;
}

function underlay() {
  if (mode() !== "generate") return state.background && state.background.image;
  return state.guide && state.guide.image;
}

function redraw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const picture = underlay();
  if (picture) ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const opacity = Number($("mask-opacity").value) / 100;
  state.entities.forEach((entity, index) => {
    ctx.globalAlpha = index === state.active ? opacity : opacity * 0.65;
    ctx.drawImage(tinted(entity.layer, entity.colour), 0, 0);
  });
  ctx.globalAlpha = 1;
  const active = state.entities[state.active];
  const colour = active ? rgb(active.colour) : "#000";
  ctx.strokeStyle = colour;
  ctx.lineWidth = Math.max(1, state.width / 256);
  if (state.drag && state.drag.tool === "rect") {
    const d = state.drag;
    ctx.strokeRect(d.x0, d.y0, d.x - d.x0, d.y - d.y0);
  }
  if (state.polygon.length) {
    ctx.beginPath();
    state.polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
  }
}

function imagePoint(event) {
  const box = $("canvas").getBoundingClientRect();
  return [(event.clientX - box.left) * state.width / box.width, (event.clientY - box.top) * state.height / box.height];
}

function brushSize() { return Number($("brush-size").value); }

function strokeTo(x, y) {
  const ctx = state.entities[state.active].layer.getContext("2d");
  ctx.globalCompositeOperation = state.drag.tool === "eraser" ? "destination-out" : "source-over";
  ctx.strokeStyle = "#fff";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.lineWidth = brushSize();
  ctx.beginPath();
  ctx.moveTo(state.drag.x, state.drag.y);
  ctx.lineTo(x, y);
  ctx.stroke();
  ctx.globalCompositeOperation = "source-over";
  state.drag.x = x;
  state.drag.y = y;
}

function onPointerDown(event) {
  if (event.button === 1 || (event.button === 0 && state.space)) {
    const wrap = $("canvas-wrap");
    state.pan = { x: event.clientX, y: event.clientY, left: wrap.scrollLeft, top: wrap.scrollTop };
    $("canvas").setPointerCapture(event.pointerId);
    event.preventDefault();
    return;
  }
  if (!state.entities[state.active] || event.button !== 0) return;
  const [x, y] = imagePoint(event);
  if (state.tool === "polygon") {
    state.polygon.push([x, y]);
    redraw();
    return;
  }
  $("canvas").setPointerCapture(event.pointerId);
  state.drag = { tool: state.tool, x0: x, y0: y, x, y };
  if (state.tool !== "rect") {
    remember();
    editableLayer();
    strokeTo(x, y);
  }
  redraw();
}

function onPointerMove(event) {
  moveCursor(event);
  if (state.pan) {
    const wrap = $("canvas-wrap");
    wrap.scrollLeft = state.pan.left - (event.clientX - state.pan.x);
    wrap.scrollTop = state.pan.top - (event.clientY - state.pan.y);
    return;
  }
  if (!state.drag) return;
  const [x, y] = imagePoint(event);
  if (state.drag.tool === "rect") { state.drag.x = x; state.drag.y = y; } else strokeTo(x, y);
  redraw();
}

function onPointerUp(event) {
  if (state.pan) { state.pan = null; return; }
  if (!state.drag) return;
  const drag = state.drag;
  if (drag.tool === "rect") {
    const [x, y] = imagePoint(event);
    remember();
    const ctx = editableLayer().getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(Math.min(drag.x0, x), Math.min(drag.y0, y), Math.abs(x - drag.x0), Math.abs(y - drag.y0));
  }
  state.drag = null;
  changed();
}

function closePolygon() {
  const points = state.polygon;
  state.polygon = [];
  if (points.length >= 3 && state.entities[state.active]) {
    remember();
    const ctx = editableLayer().getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.closePath();
    ctx.fill();
  }
  changed();
}

function moveCursor(event) {
  const cursor = $("brush-cursor");
  const brushing = (state.tool === "brush" || state.tool === "eraser") && !state.space && !state.pan;
  $("canvas").classList.toggle("brushing", brushing);
  $("canvas").classList.toggle("panning", state.space);
  cursor.hidden = !brushing || !event;
  if (cursor.hidden) return;
  const box = $("canvas").getBoundingClientRect();
  const diameter = brushSize() * box.width / state.width;
  cursor.style.width = cursor.style.height = `${diameter}px`;
  cursor.style.left = `${event.clientX - box.left}px`;
  cursor.style.top = `${event.clientY - box.top}px`;
}

// -- tools, brush size and shortcuts ------------------------------------------------------------------------

function setTool(tool) {
  state.tool = tool;
  state.polygon = [];
  $(`tool-${tool}`).checked = true;
  redraw();
}

function setBrush(size) {
  const slider = $("brush-size");
  slider.value = Math.max(1, Math.min(Number(slider.max), Math.round(size)));
  $("brush-size-value").textContent = `${slider.value} px`;
}

function scaleBrush(factor) {
  // The brush keeps its size relative to the image.
  $("brush-size").max = Math.max(16, Math.round(Math.max(state.width, state.height) * factor / 2));
  setBrush(brushSize() * factor);
}

function typingIn(target) {
  return target && target.closest && target.closest("textarea, select, input[type=text], input[type=number]");
}

function onKey(event) {
  const mod = event.ctrlKey || event.metaKey;
  if (mod && event.key === "Enter") { event.preventDefault(); generate(); return; }
  if (typingIn(event.target)) return;  // text fields keep their own keys (and their own undo)
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (mod && key === "z") { event.preventDefault(); if (event.shiftKey) redo(); else undo(); return; }
  if (mod && key === "y") { event.preventDefault(); redo(); return; }
  if (mod || event.altKey) return;
  if (state.polygon.length && key === "Enter") { event.preventDefault(); closePolygon(); return; }
  if (key === "Escape") { state.polygon = []; redraw(); return; }
  const tools = { b: "brush", e: "eraser", r: "rect", p: "polygon" };
  if (tools[key]) setTool(tools[key]);
  else if (key === "[") setBrush(brushSize() - Math.max(1, brushSize() * 0.15));
  else if (key === "]") setBrush(brushSize() + Math.max(1, brushSize() * 0.15));
  else if (key === "Delete" || key === "Backspace") clearLayer(state.active);
  else if (key === "+" || key === "=") zoomBy(1.25);
  else if (key === "-") zoomBy(0.8);
  else if (key === "0") { state.zoom = 1; layoutCanvas(); }
  else if (key === " " && (event.target === document.body || event.target === $("canvas"))) {
    state.space = true;
    event.preventDefault();
  } else return;
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
    image.onerror = () => reject(new Error("the image could not be read"));
    image.src = url;
  });
}

async function layerFromMask(url, width, height) {
  // A mask image (any size) on the canvas: on where its alpha is >= 128 when the alpha varies, else where its
  // colour's mean is >= 128 (the library's rule).
  const image = await loadImage(url);
  const layer = copyCanvas(image, width, height);
  const ctx = layer.getContext("2d");
  const pixels = ctx.getImageData(0, 0, width, height);
  const data = pixels.data;
  let alphaVaries = false;
  for (let i = 3; i < data.length; i += 4) if (data[i] !== data[3]) { alphaVaries = true; break; }
  for (let i = 0; i < width * height; i++) {
    const on = alphaVaries ? data[4 * i + 3] >= 128 : (data[4 * i] + data[4 * i + 1] + data[4 * i + 2]) / 3 >= 128;
    data[4 * i] = data[4 * i + 1] = data[4 * i + 2] = 255;
    data[4 * i + 3] = on ? 255 : 0;
  }
  ctx.putImageData(pixels, 0, 0);
  return layer;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function tooLarge(file) {
  const cap = state.info.max_upload_bytes;
  if (file.size <= cap) return false;
  notice(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB, above this app's limit of ${cap / 2 ** 20} MiB; `
         + "choose a smaller one");
  return true;
}

async function maskFromFile(entity, file) {
  if (tooLarge(file)) return;
  try {
    const layer = await layerFromMask(await readFile(file), state.width, state.height);
    remember();
    entity.layer = entity.origin = layer;
    changed();
  } catch (error) {
    notice(`${file.name}: ${error.message}`);
  }
}

async function referenceFromFile(file) {
  if (tooLarge(file)) return null;
  const uri = await readFile(file);
  try {
    const image = await loadImage(uri);
    if (image.naturalWidth * image.naturalHeight > state.info.max_pixels) {
      notice(`${file.name} is ${image.naturalWidth}×${image.naturalHeight}, above this app's limit of `
             + `${state.info.max_pixels} pixels`);
      return null;
    }
  } catch (error) {
    notice(`${file.name}: ${error.message}`);
    return null;
  }
  return uri;
}

function layoutPayload() {
  const layout = {
    prompt: $("prompt").value, width: state.width, height: state.height,
    entities: state.entities.map((entity) => {
      const item = { prompt: entity.prompt, mask: maskDataURI(entity.layer) };
      if (entity.image) Object.assign(item, { image: entity.image, image_scale: entity.imageScale });
      if (entity.lora) Object.assign(item, { lora: entity.lora, lora_scale: entity.loraScale });
      if (entity.control) Object.assign(item, { control_image: entity.control, control_scale: entity.controlScale });
      return item;
    }),
  };
  if ($("negative-prompt").value.trim()) layout.negative_prompt = $("negative-prompt").value;
  if (state.reference) layout.ip_adapter_image = state.reference;
  if (state.control) layout.control_image = state.control;
  return layout;
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function setMode(name) {
  // the modes the model runs (an edit model only edits; docs/design.md section 15): another falls back to the first
  const modes = state.info ? state.info.modes : ["generate", "inpaint"];
  $(`mode-${modes.includes(name) ? name : modes[0]}`).checked = true;
  modeChanged();
}

// -- the options: controls made from the schema the server sends (eligen.options), read and set by name --------

function optionLabel(name) {
  const words = name.replaceAll("_", " ").replace(/\bcfg\b/, "CFG");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function optionControl(option) {
  const label = document.createElement("label");
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
  input.addEventListener("change", saveSoon);
  const help = document.createElement("small");
  help.className = "help";
  help.textContent = option.help;
  if (option.kind === "bool") label.append(input, " ", optionLabel(option.name), help);
  else label.append(optionLabel(option.name), " ", input, help);
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
  const value = kind === "int" ? Number(text) : Number.parseFloat(text);
  return Number.isFinite(value) ? value : text;  // not a number: sent as typed, the server names the field
}

function params() {
  const out = { lora_scale: [...document.querySelectorAll(".lora-scale")].map((input) => Number(input.value)) };
  if (!$("random-seed").checked) {
    const seed = Number($("seed").value);
    out.seed = Number.isFinite(seed) && $("seed").value.trim() !== "" ? seed : $("seed").value;
  }
  for (const input of document.querySelectorAll("[data-option]")) {
    if (mode() === "generate" && input.closest("#inpaint-options")) continue;
    if (mode() !== "edit" && input.closest("#edit-options")) continue;
    if (!state.info.controlnet && input.closest("#control-panel")) continue;
    out[input.dataset.option] = readOption(input);
  }
  return out;
}

function setParams(given, seed) {
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
}

async function entitiesFrom(layout) {
  const entities = [];
  for (const item of layout.entities) {
    const layer = await layerFromMask(item.mask, layout.width, layout.height);
    const entity = makeEntity(item.prompt, layer, item.colour ?? null);
    if (item.image) Object.assign(entity, { image: item.image, imageScale: item.image_scale ?? 1 });
    if (item.lora) Object.assign(entity, { lora: item.lora, loraScale: item.lora_scale ?? 1 });
    if (item.control_image) Object.assign(entity, { control: item.control_image, controlScale: item.control_scale ?? 1 });
    state.entities.push(entity);  // so that the next one takes the next free colour
    entities.push(entity);
  }
  return entities;
}

async function applyRecord(record, undoable = true) {
  // A layout, a PNG's record or a plan: the page as it was made, in the mode it was made in.
  const { layout, params: given = {}, command } = record;
  if (undoable) remember();
  $("prompt").value = layout.prompt || "";
  $("negative-prompt").value = layout.negative_prompt || "";
  state.reference = layout.ip_adapter_image || null;
  state.control = layout.control_image || null;
  state.polygon = [];
  state.entities = [];
  state.width = layout.width;
  state.height = layout.height;
  state.entities = await entitiesFrom(layout);
  setCanvasSize(layout.width, layout.height);
  state.active = 0;
  setParams(given, given.seed ?? layout.seed);
  if (command) {
    state.background = null;  // the image it was made on is not part of the record
    setMode(["inpaint", "edit"].includes(command) ? command : "generate");
    $("background-status").textContent = "no image yet";
    if (command === "inpaint") notice("this layout was inpainted: upload its input image again to repaint it");
    if (command === "edit") notice("this layout was an edit: upload its input image again to edit it");
  }
  referenceChanged();
  controlChanged();
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
  const cell = Math.max(4, Math.floor(512 / Math.max(grid.rows, grid.cols)));
  canvas.width = grid.cols * cell;
  canvas.height = grid.rows * cell;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  grid.covers.forEach((cover, index) => {
    const entity = state.entities[index];
    ctx.fillStyle = rgb(entity ? entity.colour : index, 0.55);
    cover.forEach((on, token) => {
      if (on) ctx.fillRect((token % grid.cols) * cell, Math.floor(token / grid.cols) * cell, cell, cell);
    });
    const count = cover.reduce((a, b) => a + b, 0);
    if (entity) entity.tokensText = `${count} of ${grid.rows}×${grid.cols} tokens (${grid.token_pixels} px each)`;
  });
  ctx.strokeStyle = "rgba(0, 0, 0, 0.15)";
  ctx.lineWidth = 1;
  for (let c = 0; c <= grid.cols; c++) { ctx.beginPath(); ctx.moveTo(c * cell + 0.5, 0); ctx.lineTo(c * cell + 0.5, canvas.height); ctx.stroke(); }
  for (let r = 0; r <= grid.rows; r++) { ctx.beginPath(); ctx.moveTo(0, r * cell + 0.5); ctx.lineTo(canvas.width, r * cell + 0.5); ctx.stroke(); }
  document.querySelectorAll(".entity-tokens").forEach((span, i) => {
    span.textContent = state.entities[i] ? state.entities[i].tokensText || "" : "";
  });
  $("download-preview").href = canvas.toDataURL("image/png");
}

// -- generation, progress, cancel, history ------------------------------------------------------------------

async function generate() {
  if (state.running) return;
  state.attempted = true;
  notice("");
  const body = { layout: layoutPayload(), params: params(), mode: mode() };
  if (mode() !== "generate") body.background = state.background ? state.background.ref : null;
  $("generate").disabled = true;
  const { ok, data } = await api("POST", "/api/jobs", body);
  if (!ok) {
    showErrors(data.errors);
    $("generate").disabled = false;
    return;
  }
  showErrors([]);
  $("status").textContent = `queued (seed ${data.seed})`;
  track(data.id);
}

function track(id) {
  state.running = id;
  localStorage.setItem(JOB_KEY, id);
  $("generate").disabled = true;
  $("cancel").disabled = false;
  poll(id);
}

function finished() {
  state.running = null;
  localStorage.removeItem(JOB_KEY);
  $("generate").disabled = false;
  $("cancel").disabled = true;
  $("progress").hidden = true;
  refreshHistory();
}

async function poll(id) {
  if (state.running !== id) return;
  const { ok, status, data } = await api("GET", `/api/jobs/${id}`);
  if (!ok && status === 0) {  // no answer (the page is leaving, or the app restarts): try again
    setTimeout(() => poll(id), 1000);
    return;
  }
  if (!ok) {
    notice(refusal(data));
    finished();
    return;
  }
  const progress = $("progress");
  if (data.state === "queued") {
    $("status").textContent = data.position ? `waiting: ${data.position} job(s) ahead` : "starting";
  } else if (data.state === "running") {
    progress.hidden = false;
    progress.max = data.steps;
    progress.value = data.step;
    $("status").textContent = `generating: step ${data.step} of ${data.steps}`;
  } else {
    if (data.state === "error") showErrors([data.error]);
    if (data.state === "done") showResult(data.result);
    $("status").textContent = { error: "failed", cancelled: `cancelled at step ${data.step}`,
                                done: $("status").textContent }[data.state];
    document.body.dataset.finished = id;
    finished();
    return;
  }
  setTimeout(() => poll(id), 200);
}

async function cancel() {
  if (!state.running) return;
  $("status").textContent = "cancelling...";
  const { ok, data } = await api("POST", `/api/jobs/${state.running}/cancel`, {});
  if (!ok) notice(refusal(data));
}

function showResult(result) {
  state.shown = result;
  for (const [id, url] of [["result-image", result.image], ["result-overlay", result.overlay]]) $(id).src = url;
  showView($("show-overlay").getAttribute("aria-pressed") === "true" ? "overlay" : "image");
  for (const [id, url, name] of [["download-png", result.image, result.name],
                                 ["download-overlay", result.overlay, result.overlay_name],
                                 ["download-layout", result.layout, result.layout_name]]) {
    $(id).href = url;
    $(id).download = name;
    $(id).classList.remove("disabled");
  }
  $("use-background").disabled = false;
  $("seed").value = result.seed;
  const made = { inpaint: "inpainted", edit: "edited" }[result.mode] || "generated";
  $("result-caption").textContent = `${made}: seed ${result.seed}, `
    + `${result.width}×${result.height} — click to open full size`;
  $("status").textContent = `done: seed ${result.seed}, ${result.width}×${result.height}`;
  for (const button of document.querySelectorAll("#history button")) {
    button.setAttribute("aria-current", String(button.dataset.id === result.id));
  }
  document.body.dataset.result = result.id;
  saveSoon();
}

function showView(view) {
  const overlay = view === "overlay";
  $("show-image").setAttribute("aria-pressed", String(!overlay));
  $("show-overlay").setAttribute("aria-pressed", String(overlay));
  if (!state.shown) return;
  $("result-image").hidden = overlay;
  $("result-overlay").hidden = !overlay;
  $("result-link").href = overlay ? state.shown.overlay : state.shown.image;
}

async function refreshHistory() {
  const { ok, data } = await api("GET", "/api/jobs");
  if (!ok) return;
  $("history").replaceChildren(...data.jobs.map((result) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = result.id;
    button.title = `${result.prompt} (seed ${result.seed})`;
    button.setAttribute("aria-label", `Show the result with seed ${result.seed}: ${result.prompt}`);
    button.setAttribute("aria-current", String(Boolean(state.shown && state.shown.id === result.id)));
    const image = document.createElement("img");
    image.src = result.image;
    image.alt = "";
    button.append(image);
    button.addEventListener("click", () => showResult(result));
    item.append(button);
    return item;
  }));
}

// -- images to inpaint, guides, references, loading and planning --------------------------------------------

async function setBackground(ref, url, name) {
  const image = await loadImage(url);
  remember();
  state.background = { ref, image, name, url };
  setCanvasSize(image.naturalWidth, image.naturalHeight);
  $("background-status").textContent = `${name}: ${image.naturalWidth}×${image.naturalHeight}`;
  setMode(mode() === "generate" ? "inpaint" : mode());
  changed();
}

async function upload(file) {
  notice("");
  if (tooLarge(file)) return;
  $("background-status").textContent = "uploading...";
  const { ok, data } = await api("POST", "/api/upload", { name: file.name, data: await readFile(file) });
  if (!ok) {
    $("background-status").textContent = state.background ? state.background.name : "no image yet";
    notice(refusal(data));
    return;
  }
  await setBackground(data.id, data.url, file.name);
}

async function setGuide(file) {
  try {
    state.guide = { image: await loadImage(URL.createObjectURL(file)), name: file.name };
  } catch (error) {
    notice(`${file.name}: ${error.message}`);
    return;
  }
  $("guide-clear").hidden = false;
  redraw();
}

function referenceChanged() {
  $("reference-status").textContent = state.reference ? "chosen" : "none";
  $("reference-clear").hidden = !state.reference;
  scheduleCheck();
  saveSoon();
}

function controlChanged() {
  $("control-status").textContent = state.control ? "chosen" : "none";
  $("control-clear").hidden = !state.control;
  scheduleCheck();
  saveSoon();
}

async function loadFile(file) {
  notice("");
  if (tooLarge(file)) return;
  const { ok, data } = await api("POST", "/api/load", { name: file.name, data: await readFile(file) });
  if (!ok) {
    notice(refusal(data));
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
    notice(refusal(data));
    return;
  }
  await applyRecord({ layout: data.layout, params: {} });
}

function exampleLayout() {
  // Two boxes to start from: shapes for the shipped tiny model (it knows nothing else), objects for the rest.
  const [width, height] = [state.width, state.height];
  const tiny = state.info.model === "eligen-tiny";
  const box = (x0, y0, x1, y1) => {
    const layer = blankCanvas(width, height);
    const ctx = layer.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(Math.round(x0 * width), Math.round(y0 * height), Math.round((x1 - x0) * width), Math.round((y1 - y0) * height));
    return layer.toDataURL("image/png");
  };
  return {
    prompt: tiny ? "a red circle and a blue square on a gray background" : "a red apple and a blue cup on a wooden table",
    width, height, entities: [
      { prompt: tiny ? "a red circle" : "a shiny red apple", mask: box(0.06, 0.1, 0.47, 0.5) },
      { prompt: tiny ? "a blue square" : "a blue ceramic cup", mask: box(0.53, 0.45, 0.94, 0.9) },
    ],
  };
}

function modeChanged() {
  const input = mode() !== "generate";  // inpaint and edit work on an uploaded image
  $("inpaint-panel").hidden = !input;
  $("edit-options").hidden = mode() !== "edit";
  $("upload-label").textContent = mode() === "edit" ? "Upload image to edit" : "Upload image to inpaint";
  $("width").disabled = $("height").disabled = input && !!state.background;
  redraw();
  saveSoon();
}

// -- the page across reloads --------------------------------------------------------------------------------

function saveSoon() {
  clearTimeout(state.saveTimer);
  state.saveTimer = setTimeout(save, 300);
}

function save() {
  clearTimeout(state.saveTimer);
  state.saveTimer = null;
  if (!state.info) return;
  const page = {
    layout: { ...layoutPayload(), negative_prompt: $("negative-prompt").value },
    colours: state.entities.map((entity) => entity.colour),
    params: params(), randomSeed: $("random-seed").checked, mode: mode(),
    background: state.background ? { ref: state.background.ref, url: state.background.url, name: state.background.name } : null,
    shown: state.shown ? state.shown.id : null,
  };
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(page));
  } catch (error) {
    notice("this layout is too large to keep across reloads; download it to keep it");
  }
}

async function restorePage() {
  let page = null;
  try { page = JSON.parse(localStorage.getItem(STORE_KEY)); } catch (error) { page = null; }
  if (!page || !page.layout || sizeProblem(page.layout.width, page.layout.height)) return false;
  try {
    page.layout.entities.forEach((entity, i) => { entity.colour = page.colours ? page.colours[i] : null; });
    await applyRecord({ layout: page.layout, params: page.params || {} }, false);
    if (page.randomSeed) { $("random-seed").checked = true; $("seed").disabled = true; }
    if (page.background) {
      try { await setBackground(page.background.ref, page.background.url, page.background.name); } catch (error) { /* expired */ }
    }
    setMode(page.mode || "generate");
    if (page.shown) {
      const { ok, data } = await api("GET", `/api/jobs/${page.shown}`);
      if (ok && data.state === "done") showResult(data.result);
    }
  } catch (error) {
    return false;
  }
  return true;
}

// -- start --------------------------------------------------------------------------------------------------

function loraControls(names) {
  return names.map((name, i) => {
    const label = document.createElement("label");
    label.textContent = `LoRA ${name} scale `;
    const input = document.createElement("input");
    input.type = "number";
    input.step = "0.1";
    input.value = "1";
    input.className = "lora-scale";
    input.dataset.index = i;
    input.addEventListener("change", saveSoon);
    label.append(input);
    return label;
  });
}

function buildControls(info) {
  $("model-name").textContent = `${info.model} (${info.family})`;
  for (const id of ["width", "height"]) { $(id).step = info.token_pixels; $(id).min = info.token_pixels; }
  const input = ["InpaintOptions", "EditOptions"];
  $("sampling-options").replaceChildren(...info.options.filter((o) => !input.includes(o.group)).map(optionControl));
  $("inpaint-options").replaceChildren(...info.options.filter((o) => o.group === "InpaintOptions").map(optionControl));
  $("edit-options").replaceChildren(...info.options.filter((o) => o.group === "EditOptions").map(optionControl));
  for (const name of ["generate", "inpaint", "edit"]) $(`mode-${name}-label`).hidden = !info.modes.includes(name);
  $(`mode-${info.modes[0]}`).checked = true;
  $("start-generate").hidden = info.modes.includes("edit");
  $("start-edit").hidden = !info.modes.includes("edit");
  $("lora-scales").replaceChildren(...loraControls(info.loras));
  const steps = document.querySelector("[data-option=steps]");
  if (steps) steps.max = info.max_steps;
  $("plan-panel").hidden = !info.plan;
  $("reference-panel").hidden = !info.ip_adapter;
  $("control-panel").hidden = !info.controlnet;
  $("start-here").hidden = localStorage.getItem(START_KEY) === "1";
}

function bindCanvas() {
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  canvas.addEventListener("pointerleave", () => { $("brush-cursor").hidden = true; });
  canvas.addEventListener("dblclick", closePolygon);
  $("canvas-wrap").addEventListener("wheel", (event) => {
    if (!event.ctrlKey) return;
    event.preventDefault();
    zoomBy(event.deltaY < 0 ? 1.15 : 1 / 1.15);
  }, { passive: false });
  document.addEventListener("keydown", onKey);
  document.addEventListener("keyup", (event) => { if (event.key === " ") state.space = false; });
  window.addEventListener("resize", layoutCanvas);
  window.addEventListener("pagehide", () => { if (state.saveTimer) save(); });  // a pending save is not lost
}

function onFile(id, action) {
  $(id).addEventListener("change", (event) => { if (event.target.files[0]) action(event.target.files[0]); event.target.value = ""; });
}

function bindControls() {
  document.querySelectorAll("input[name=tool]").forEach((input) => input.addEventListener("change", () => setTool(input.value)));
  $("brush-size").addEventListener("input", () => setBrush(brushSize()));
  $("mask-opacity").addEventListener("input", redraw);
  $("zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("zoom-fit").addEventListener("click", () => { state.zoom = 1; layoutCanvas(); });
  $("add-entity").addEventListener("click", () => addEntity());
  for (const id of ["prompt", "negative-prompt"]) $(id).addEventListener("input", () => { scheduleCheck(); saveSoon(); });
  $("width").addEventListener("change", sizeChanged);
  $("height").addEventListener("change", sizeChanged);
  $("random-seed").addEventListener("change", () => { $("seed").disabled = $("random-seed").checked; saveSoon(); });
  $("seed").addEventListener("change", saveSoon);
  document.querySelectorAll("input[name=mode]").forEach((input) => input.addEventListener("change", modeChanged));
  $("generate").addEventListener("click", generate);
  $("cancel").addEventListener("click", cancel);
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("new-layout").addEventListener("click", () => applyRecord({ layout: { prompt: "", width: state.width, height: state.height,
    entities: [{ prompt: "", mask: blankCanvas(state.width, state.height).toDataURL() }] }, params: {} }));
  onFile("upload-image", upload);
  onFile("load-file", loadFile);
  onFile("guide-file", setGuide);
  onFile("reference-file", async (file) => { const uri = await referenceFromFile(file); if (uri) { state.reference = uri; referenceChanged(); } });
  $("reference-clear").addEventListener("click", () => { state.reference = null; referenceChanged(); });
  onFile("control-file", async (file) => { const uri = await referenceFromFile(file); if (uri) { state.control = uri; controlChanged(); } });
  $("control-clear").addEventListener("click", () => { state.control = null; controlChanged(); });
  $("control-scale").addEventListener("change", saveSoon);
  $("guide-clear").addEventListener("click", () => { state.guide = null; $("guide-clear").hidden = true; redraw(); });
  $("plan-button").addEventListener("click", plan);
  $("use-background").addEventListener("click", () => {
    const shown = state.shown;  // the image on the screen, whatever is running now
    if (shown) setBackground(`job:${shown.id}`, shown.image, shown.name);
  });
  $("show-image").addEventListener("click", () => showView("image"));
  $("show-overlay").addEventListener("click", () => showView("overlay"));
  $("preview-size").addEventListener("click", () => {
    const large = $("token-preview").classList.toggle("large");
    $("preview-size").setAttribute("aria-pressed", String(large));
    $("preview-size").textContent = large ? "Smaller" : "Enlarge";
  });
  $("load-example").addEventListener("click", () => applyRecord({ layout: exampleLayout(), params: {} }));
  $("dismiss-start").addEventListener("click", () => { localStorage.setItem(START_KEY, "1"); $("start-here").hidden = true; });
}

async function start() {
  const { ok, data } = await api("GET", "/api/info");
  if (!ok) { notice(`the app's server did not answer: ${refusal(data)}`); return; }
  state.info = data;
  buildControls(data);
  bindCanvas();
  bindControls();
  const [width, height] = data.native_size;
  setCanvasSize(width, height);
  $("brush-size").max = Math.max(16, Math.round(Math.max(width, height) / 2));
  setBrush(Math.max(1, Math.round(Math.max(width, height) / 8)));
  if (!(await restorePage())) {
    state.entities = [makeEntity()];
    modeChanged();  // the model's first mode (an edit model's is Edit)
    changed();
  }
  state.undo = [];
  state.redo = [];
  undoButtons();
  const running = localStorage.getItem(JOB_KEY);
  if (running) track(running);  // a reloaded tab finds its job
  refreshHistory();
  document.body.dataset.ready = "1";
}

start();
