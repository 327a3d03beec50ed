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
  select.addEventListener("change", () => {
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

document.addEventListener("DOMContentLoaded", () => {
  setupDropzone();
  document.querySelectorAll(".card.ok").forEach(setupCard);
});
