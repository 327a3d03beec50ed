// Progressive enhancement of the upload page: everything also works as a plain form post.
"use strict";

function setupDropzone() {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("file");
  const chosen = document.getElementById("chosen");
  if (!zone || !input) return;
  const list = () => {
    chosen.replaceChildren(...Array.from(input.files).map((f) => {
      const li = document.createElement("li");
      li.textContent = f.name;
      return li;
    }));
  };
  input.addEventListener("change", list);
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      list();
    }
  });
}

// Re-label a result card for another operating point: the calibrated probability stays, the threshold moves.
function setupCard(card) {
  const probability = Number(card.dataset.probability);
  const thresholds = JSON.parse(card.dataset.thresholds);
  const classNames = JSON.parse(card.dataset.classNames);
  const select = card.querySelector(".card-operating-point");
  // No selector when every operating point has the same threshold (nothing to switch).
  if (select) select.addEventListener("change", () => {
    if (!(select.value in thresholds)) return;
    const threshold = thresholds[select.value];
    const label = probability >= threshold ? classNames[1] : classNames[0];
    card.querySelector(".label").textContent = label;
    card.querySelector(".threshold-value").textContent = threshold.toFixed(3);
    card.querySelector(".bar .threshold").style.left = (threshold * 100).toFixed(1) + "%";
    classNames.forEach((name) => card.classList.toggle(name.toLowerCase(), name === label));
  });
  const heatmap = card.querySelector(".heatmap");
  if (!heatmap) return;
  const toggle = card.querySelector(".cam-toggle");
  const opacity = card.querySelector(".cam-opacity");
  const update = () => {
    heatmap.hidden = !toggle.checked;
    heatmap.style.opacity = String(Number(opacity.value) / 100);
  };
  toggle.addEventListener("change", update);
  opacity.addEventListener("input", update);
  update();
}

// While the form posts, say so: a plain form post shows nothing until the answer arrives.
function setupWorking() {
  const form = document.getElementById("upload-form");
  const working = document.getElementById("working");
  if (!form || !working) return;
  form.addEventListener("submit", () => {
    const count = document.getElementById("file").files.length;
    working.textContent = `Analysing ${count} image${count === 1 ? "" : "s"}…`;
    working.hidden = false;
    form.setAttribute("aria-busy", "true");
    form.querySelector("button[type=submit]").disabled = true;
  });
}

// Download the page's results (no images) as CSV or JSON, built in the browser from the page's data.
function setupDownloads() {
  const data = document.getElementById("results-data");
  if (!data) return;
  const results = () => JSON.parse(data.textContent);  // read at click: "Analyse anyway" updates it
  const save = (name, type, text) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], {type}));
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  };
  const columns = ["filename", "status", "label", "probability_pneumonia", "threshold", "operating_point",
                   "review_recommended", "review_reasons", "outside_gate", "reasons", "gate_reasons", "error",
                   "image_sha256"];
  const cell = (value) => {
    let text = value == null ? "" : Array.isArray(value) ? value.join(";")
      : typeof value === "object" ? (value.message || "") : String(value);
    if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;  // a file name must not become a spreadsheet formula
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  };
  document.getElementById("download-json").addEventListener("click", () =>
    save("pneumoscan-results.json", "application/json", JSON.stringify(results(), null, 2) + "\n"));
  document.getElementById("download-csv").addEventListener("click", () =>
    save("pneumoscan-results.csv", "text/csv",
         [columns.join(","), ...results().map((r) => columns.map((c) => cell(r[c])).join(","))].join("\n") + "\n"));
}

// "Analyse anyway" on a refused film: send the same file again, with force=true. The page holds
// the upload (the server kept nothing), so it is posted with the form's token, and the answer's
// card replaces the refused one in place: the other films' cards stay as they were.
function setupAnalyseAnyway() {
  const form = document.getElementById("upload-form");
  if (!form) return;
  document.querySelectorAll(".analyse-anyway").forEach((button) => button.addEventListener("click", async () => {
    const bytes = Uint8Array.from(atob(button.dataset.upload), (c) => c.charCodeAt(0));
    const body = new FormData();
    body.append("csrf_token", form.querySelector("input[name=csrf_token]").value);
    body.append("file", new File([bytes], button.dataset.filename));
    body.append("force", "true");
    const point = form.querySelector("select[name=operating_point]");
    if (point) body.append("operating_point", point.value);
    const explain = form.querySelector("input[name=explain]");
    if (explain && explain.checked) body.append("explain", "true");
    button.disabled = true;
    button.textContent = "Analysing\u2026";
    const response = await fetch(form.action || window.location.pathname, {method: "POST", body});
    const answer = new DOMParser().parseFromString(await response.text(), "text/html");
    const card = answer.querySelector(".results .card");
    const old = button.closest(".card");
    if (!card) {
      button.textContent = (answer.querySelector(".error") || {}).textContent || "The server could not analyse it";
      return;
    }
    const cards = Array.from(document.querySelectorAll(".results .card"));
    old.replaceWith(card);
    if (card.classList.contains("ok")) setupCard(card);
    const data = document.getElementById("results-data");
    const fresh = answer.getElementById("results-data");
    if (data && fresh) {  // the downloads carry the new answer too
      const results = JSON.parse(data.textContent);
      results[cards.indexOf(old)] = JSON.parse(fresh.textContent)[0];
      data.textContent = JSON.stringify(results);
    }
  }));
}

document.addEventListener("DOMContentLoaded", () => {
  setupDropzone();
  setupAnalyseAnyway();
  setupWorking();
  setupDownloads();
  document.querySelectorAll(".card.ok").forEach(setupCard);
});
