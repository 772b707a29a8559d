// The page of `mnist-ray serve`: sends an image (a file, or the drawing) to POST predict and
// shows what comes back. Everything from the server is displayed as text (textContent), never
// as HTML; the one image is a data: URL built only from checked base64.
"use strict";

const $ = (id) => document.getElementById(id);
const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;
let rows = [];

function buildBars(names) {
  const bars = $("bars");
  bars.replaceChildren();
  rows = names.map((name) => {
    const row = document.createElement("div");
    row.className = "bar-row";
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "bar-pct";
    row.append(label, track, pct);
    bars.append(row);
    return { row, fill, pct };
  });
}

function show(answer) {
  $("error").textContent = "";
  $("result-class").textContent = String(answer.class_name);
  $("result-confidence").textContent = (100 * Number(answer.confidence)).toFixed(1) + " %";
  $("timing").textContent = "preprocessing " + Number(answer.preprocess_ms).toFixed(1) + " ms, model " +
    Number(answer.model_ms).toFixed(1) + " ms (batch of " + Number(answer.batch_size) + ")";
  if (typeof answer.model_input_png === "string" && BASE64.test(answer.model_input_png)) {
    $("seen").src = "data:image/png;base64," + answer.model_input_png;
  }
  if (rows.length !== answer.probabilities.length) {
    buildBars(answer.probabilities.map((_, i) => String(i)));
  }
  answer.probabilities.forEach((p, i) => {
    const percent = 100 * Number(p);
    rows[i].fill.style.width = Math.max(0, Math.min(100, percent)).toFixed(1) + "%";
    rows[i].pct.textContent = percent.toFixed(1) + " %";
    rows[i].row.classList.toggle("top", i === answer.class);
  });
  document.body.dataset.answered = String(Number(document.body.dataset.answered || 0) + 1);
}

function showError(message) {
  $("result-class").textContent = "–";
  $("result-confidence").textContent = "–";
  $("error").textContent = message;
  document.body.dataset.answered = String(Number(document.body.dataset.answered || 0) + 1);
}

async function predict(blob) {
  $("error").textContent = "";
  try {
    const response = await fetch("predict?include_image=true", {
      method: "POST", body: blob, headers: { "Content-Type": blob.type || "application/octet-stream" },
    });
    let answer;
    try {
      answer = await response.json();
    } catch (e) {
      answer = { error: "HTTP " + response.status + ": the answer is not JSON" };
    }
    if (response.ok) {
      show(answer);
    } else {
      showError(String(answer.error || "HTTP " + response.status));
    }
  } catch (e) {
    showError("cannot reach the server: " + e);
  }
}

function pickFile(file) {
  if (!file) return;
  $("file-name").textContent = file.name + " (" + file.size.toLocaleString() + " bytes)";
  predict(file);
}

function setUpDrop() {
  const drop = $("drop");
  $("file-input").addEventListener("change", (e) => pickFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
}

function setUpCanvas() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  ctx.lineWidth = 20;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#000";
  let drawing = false;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  canvas.addEventListener("pointerdown", (e) => {
    drawing = true;
    canvas.setPointerCapture(e.pointerId);
    ctx.beginPath();
    ctx.moveTo(...at(e));
    ctx.lineTo(...at(e));
    ctx.stroke();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.lineTo(...at(e));
    ctx.stroke();
  });
  const finish = () => {
    if (!drawing) return;
    drawing = false;
    $("file-name").textContent = "your drawing";
    canvas.toBlob((blob) => predict(blob), "image/png");
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  $("clear").addEventListener("click", clear);
}

async function showModel() {
  try {
    const ready = await (await fetch("readyz")).json();
    $("model-version").textContent = String(ready.model_version) + " (" + String(ready.runtime) + ")";
    if (Array.isArray(ready.class_names)) buildBars(ready.class_names.map(String));
  } catch (e) {
    $("model-version").textContent = "not ready";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  buildBars(["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
  setUpDrop();
  setUpCanvas();
  showModel();
});
