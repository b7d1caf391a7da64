// polysense search page: plain JS, no build step. Talks to POST /search and GET /health.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form");
const textInput = $("query-text");
const fileInput = $("image-file");
const dropZone = $("drop-zone");
const preview = $("query-preview");
const results = $("results");
const statusLine = $("status");
const errorBox = $("error");
const template = $("card-template");

let lastQuery = null; // {text} or {file}: re-run when the options change

function options() {
  return {
    k: Number($("k").value),
    modality: form.querySelector("input[name=modality]:checked").value,
  };
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error} (HTTP ${response.status})`;
  } catch (_) {
    // not JSON: fall through
  }
  return `the server answered HTTP ${response.status} ${response.statusText}`;
}

async function search(query) {
  lastQuery = query;
  const { k, modality } = options();
  let request;
  if (query.file) {
    const body = new FormData();
    body.append("file", query.file);
    body.append("k", String(k));
    body.append("modality", modality);
    request = { method: "POST", body };
  } else {
    request = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: query.text, k, modality }),
    };
  }
  showError("");
  statusLine.textContent = "searching…";
  form.setAttribute("aria-busy", "true");
  try {
    const response = await fetch("/search", request);
    if (!response.ok) {
      showError(await readError(response));
      statusLine.textContent = "";
      results.replaceChildren(); // no stale results under an error
      return;
    }
    render(await response.json());
  } catch (err) {
    showError(`could not reach the server: ${err.message}`);
    statusLine.textContent = "";
  } finally {
    form.removeAttribute("aria-busy");
  }
}

function render(data) {
  results.replaceChildren();
  const what = data.query.text !== undefined ? `“${data.query.text}”` : "the uploaded image";
  const kind = data.query.modality === "text" ? "captions" : "images";
  statusLine.textContent =
    `${data.results.length} ${kind} for ${what} in ${data.took_ms.toFixed(1)} ms`;
  data.results.forEach((hit, i) => {
    const card = template.content.firstElementChild.cloneNode(true);
    const img = card.querySelector("img");
    img.src = hit.image_url;
    img.alt = hit.caption ? `result ${i + 1}: ${hit.caption}` : `result ${i + 1}: ${hit.key}`;
    card.querySelector(".caption").textContent = hit.caption || "(no caption)";
    const score = card.querySelector(".score");
    score.textContent = `score ${hit.score.toFixed(3)}`;
    score.title = "cosine similarity to the query";
    card.querySelector(".key").textContent = hit.key;
    const path = card.querySelector(".path");
    path.textContent = hit.image_path || "";
    path.hidden = !hit.image_path; // images read from tar shards have no file of their own
    path.title = "the image file, relative to the indexed source's folder";
    results.append(card);
  });
}

function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (type ${file.type || "unknown"}); drop a PNG or JPEG`);
    return;
  }
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = `query image: ${file.name}`;
  preview.hidden = false;
  textInput.value = ""; // the image is the query now
  search({ file });
}

preview.addEventListener("error", () => {
  preview.hidden = true; // the browser cannot show it either; the server's message says why
});

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = textInput.value.trim();
  if (text) {
    preview.hidden = true;
    search({ text });
  } else {
    showError("type a description, or drop an image to search with");
  }
});

form.querySelectorAll("input[name=modality]").forEach((radio) =>
  radio.addEventListener("change", () => lastQuery && search(lastQuery)),
);
$("k").addEventListener("change", () => lastQuery && search(lastQuery));

fileInput.addEventListener("change", () => {
  searchImage(fileInput.files[0]);
  fileInput.value = ""; // choosing the same file again still fires change
});

["dragenter", "dragover"].forEach((name) =>
  dropZone.addEventListener(name, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  }),
);
["dragleave", "drop"].forEach((name) =>
  dropZone.addEventListener(name, () => dropZone.classList.remove("dragging")),
);
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  searchImage(event.dataTransfer.files[0]);
});

fetch("/health")
  .then((response) => (response.ok ? response.json() : Promise.reject(response)))
  .then((health) => {
    $("index-info").textContent = `${health.items} items · ${health.dim}-d embeddings`;
  })
  .catch(() => {
    $("index-info").textContent = "the server did not answer /health";
  });
