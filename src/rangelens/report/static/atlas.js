// rangelens atlas: sortable tables, the neuron-table filter, histogram legend toggles and SVG
// download. Plain JavaScript, no dependencies; works from file:// and under a strict CSP.
"use strict";

function cellKey(cell, numeric) {
  const raw = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent.trim();
  if (!numeric) return raw.toLowerCase();
  const x = parseFloat(raw);
  return Number.isNaN(x) ? null : x;
}

function sortBy(table, col, descending) {
  const header = table.tHead.rows[table.tHead.rows.length - 1];
  const numeric = header.cells[col].dataset.type === "num";
  const body = table.tBodies[0];
  const rows = Array.from(body.rows).map((row) => [cellKey(row.cells[col], numeric), row]);
  rows.sort((a, b) => {
    if (a[0] === b[0]) return 0;
    if (a[0] === null) return 1; // missing values last, whatever the direction
    if (b[0] === null) return -1;
    const order = a[0] < b[0] ? -1 : 1;
    return descending ? -order : order;
  });
  rows.forEach((pair) => body.appendChild(pair[1]));
  Array.from(header.cells).forEach((th, i) => {
    if (i === col) th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    else th.removeAttribute("aria-sort");
  });
}

document.querySelectorAll("table.sortable").forEach((table) => {
  const header = table.tHead.rows[table.tHead.rows.length - 1];
  Array.from(header.cells).forEach((th, col) => {
    th.tabIndex = 0;
    const sort = () => sortBy(table, col, th.getAttribute("aria-sort") === "ascending");
    th.addEventListener("click", sort);
    th.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        sort();
      }
    });
  });
});

const neuronTable = document.getElementById("neuron-table");
if (neuronTable) {
  const query = document.getElementById("filter");
  const concept = document.getElementById("concept-filter");
  const minConcepts = document.getElementById("min-concepts");
  const explainedOnly = document.getElementById("explained-only");
  const count = document.getElementById("row-count");
  const empty = document.getElementById("no-rows");
  const rows = Array.from(neuronTable.tBodies[0].rows);
  const apply = () => {
    const terms = query.value.toLowerCase().split(/\s+/).filter(Boolean);
    const wanted = concept.value;
    const least = parseInt(minConcepts.value, 10) || 1;
    let shown = 0;
    rows.forEach((row) => {
      const concepts = row.dataset.concepts ? row.dataset.concepts.split(" ") : [];
      const visible =
        terms.every((t) => row.dataset.search.includes(t)) &&
        (wanted === "" || concepts.includes(wanted)) &&
        concepts.length >= least &&
        (!explainedOnly || !explainedOnly.checked || row.dataset.explained === "1");
      row.hidden = !visible;
      if (visible) shown += 1;
    });
    count.textContent = shown === rows.length ? `${rows.length} neurons` : `${shown} of ${rows.length} neurons`;
    empty.hidden = shown > 0;
  };
  const params = new URLSearchParams(window.location.search);
  if (params.has("concept")) concept.value = params.get("concept");
  if (params.has("q")) query.value = params.get("q");
  [query, concept, minConcepts, explainedOnly].forEach((el) => {
    if (el) el.addEventListener("input", apply);
  });
  apply();
}

document.querySelectorAll("svg.hist .legend").forEach((entry) => {
  const toggle = () => {
    const svg = entry.ownerSVGElement;
    const hidden = entry.classList.toggle("off");
    svg.querySelectorAll(`.series[data-concept="${entry.dataset.concept}"], .band[data-concept="${entry.dataset.concept}"]`)
      .forEach((el) => el.classList.toggle("off", hidden));
  };
  entry.addEventListener("click", toggle);
  entry.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      toggle();
    }
  });
});

document.querySelectorAll("[data-download-svg]").forEach((button) => {
  button.addEventListener("click", () => {
    const svg = button.closest(".card").querySelector("svg.hist").cloneNode(true);
    svg.querySelectorAll(".off:not(.legend), .bin").forEach((el) => el.remove());
    const blob = new Blob([new XMLSerializer().serializeToString(svg)], { type: "image/svg+xml" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = button.dataset.downloadSvg;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  });
});
