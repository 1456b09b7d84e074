// The page of `urbanseg serve`: one POST /v1/segment?output=label per image. The colour
// mask and the class shares are computed here from the label PNG and the palette of
// GET /v1/model, so what the page shows is what the API returns, from one model run.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let labelUrl = null;

function setState(state, message, isError) {
  document.body.dataset.state = state;
  $("status").textContent = message;
  $("status").classList.toggle("error", Boolean(isError));
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function problem(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.detail || body.error}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/model", { headers: authHeaders() });
  if (!response.ok) {
    $("model").textContent = "model description unavailable (" + (await problem(response)) + ")";
    return null;
  }
  const m = await response.json();
  $("model").textContent = `${m.model.name} (${m.model.file}, ${m.model.engine}), ` +
    `${m.classes.length} classes of ${m.label_set}, input ${m.input_size[0]}x${m.input_size[1]}`;
  return m;
}

async function decodeLabels(blob) {
  // Grey PNG -> class index per pixel: no colour conversion, so values come through exact.
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const labels = new Uint8Array(bitmap.width * bitmap.height);
  for (let i = 0; i < labels.length; i++) labels[i] = rgba[4 * i];
  return { labels, width: bitmap.width, height: bitmap.height };
}

function paintMask(seg) {
  const canvas = $("mask");
  canvas.width = seg.width;
  canvas.height = seg.height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(seg.width, seg.height);
  const counts = new Array(model.classes.length).fill(0);
  for (let i = 0; i < seg.labels.length; i++) {
    const k = seg.labels[i];
    const rgb = model.palette[k] || [0, 0, 0];
    out.data[4 * i] = rgb[0];
    out.data[4 * i + 1] = rgb[1];
    out.data[4 * i + 2] = rgb[2];
    out.data[4 * i + 3] = 255;
    counts[k] = (counts[k] || 0) + 1;
  }
  ctx.putImageData(out, 0, 0);
  return counts;
}

async function paintImage(file, width, height) {
  const canvas = $("image");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  try {
    // The server does not apply EXIF rotation (as predict): neither does the page.
    const bitmap = await createImageBitmap(file, { imageOrientation: "none" });
    ctx.drawImage(bitmap, 0, 0, width, height);
    return true;
  } catch (e) {
    ctx.fillStyle = "#888";
    ctx.fillRect(0, 0, width, height);
    return false; // e.g. TIFF: browsers cannot show it; the mask is still right
  }
}

function showLegend(counts, total) {
  const legend = $("legend");
  legend.replaceChildren();
  const order = counts.map((n, k) => k).sort((a, b) => counts[b] - counts[a]);
  for (const k of order) {
    const li = document.createElement("li");
    li.dataset.class = String(k);
    li.dataset.pixels = String(counts[k]);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = `rgb(${model.palette[k].join(",")})`;
    const name = document.createElement("span");
    name.textContent = model.classes[k];
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = (100 * counts[k] / total).toFixed(1) + " %";
    li.append(swatch, name, share);
    legend.append(li);
  }
}

async function segment(file) {
  setState("busy", `segmenting ${file.name}...`);
  $("download").hidden = true;
  try {
    if (!model) model = await loadModel();
    if (!model) throw new Error("cannot read GET /v1/model (is a token needed?)");
    const query = new URLSearchParams({ output: "label" });
    if ($("tile").checked) query.set("tile", "1");
    const response = await fetch("/v1/segment?" + query, {
      method: "POST",
      body: file,
      headers: { ...authHeaders(), "Content-Type": file.type || "application/octet-stream" },
    });
    if (!response.ok) throw new Error(await problem(response));
    const blob = await response.blob();
    const seg = await decodeLabels(blob);
    const counts = paintMask(seg);
    const shown = await paintImage(file, seg.width, seg.height);
    showLegend(counts, seg.labels.length);
    if (labelUrl) URL.revokeObjectURL(labelUrl);
    labelUrl = URL.createObjectURL(blob);
    const link = $("download");
    link.href = labelUrl;
    link.download = file.name.replace(/\.[^.]*$/, "") + "_labels.png";
    link.hidden = false;
    $("result").hidden = false;
    setState("done", `${file.name}: ${seg.width}x${seg.height}` +
      (shown ? "" : " (your browser cannot show this format: the mask is drawn over grey)"));
  } catch (e) {
    setState("error", `${file.name}: ${e.message}`, true);
  }
}

function setOpacity() {
  $("mask").style.opacity = $("opacity").value;
  $("opacity-value").textContent = $("opacity").value;
}

document.addEventListener("DOMContentLoaded", async () => {
  setOpacity();
  $("opacity").addEventListener("input", setOpacity);
  $("file").addEventListener("change", () => {
    if ($("file").files.length) segment($("file").files[0]);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) segment(e.dataTransfer.files[0]);
  });
  $("token").addEventListener("change", async () => { model = await loadModel(); });
  model = await loadModel();
});
