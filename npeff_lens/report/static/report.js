// npeff_lens report: sortable / filterable component index, coefficient histograms. No network, no framework.
(function () {
  "use strict";

  function cellKey(row, idx, type) {
    var cell = row.children[idx];
    var v = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent.trim();
    if (type === "num") {
      return v === "" || isNaN(Number(v)) ? null : Number(v);
    }
    return v.toLowerCase();
  }

  function sortBy(th) {
    var table = th.closest("table");
    var tbody = table.tBodies[0];
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var type = th.getAttribute("data-sort");
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    th.parentNode.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = cellKey(a, idx, type), y = cellKey(b, idx, type);
      if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }  // missing values last
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return dir === "ascending" ? c : -c;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }

  function setUpIndex() {
    document.querySelectorAll("table.sortable th[data-sort]").forEach(function (th) {
      th.addEventListener("click", function () { sortBy(th); });
    });
    var table = document.getElementById("components");
    if (!table) { return; }
    var box = document.getElementById("filter");
    var tuned = document.getElementById("tuned-only");
    var alive = document.getElementById("alive-only");
    var count = document.getElementById("count");
    function apply() {
      var q = box.value.trim().toLowerCase(), shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        var ok = (!q || r.textContent.toLowerCase().indexOf(q) >= 0) &&
          (!tuned.checked || r.getAttribute("data-tuned") === "1") &&
          (!alive.checked || r.getAttribute("data-alive") === "1");
        r.hidden = !ok;
        shown += ok ? 1 : 0;
      });
      count.textContent = shown + " of " + table.tBodies[0].rows.length + " components";
    }
    [box, tuned, alive].forEach(function (el) { el.addEventListener("input", apply); el.addEventListener("change", apply); });
    apply();
  }

  function setUpHistogram() {
    var data = document.getElementById("hist-data");
    var div = document.getElementById("hist");
    if (!data || !div) { return; }
    var h = JSON.parse(data.textContent);
    if (!window.Plotly || !h.x.length) {
      div.textContent = h.x.length ? "(plotly.js did not load)" : "no active coefficients";
      return;
    }
    window.Plotly.newPlot(div, [{
      type: "bar", x: h.x, y: h.y, marker: { color: "#e0782a" },
      hovertemplate: "coefficient %{x:.3g}<br>%{y} examples<extra></extra>"
    }], {
      margin: { l: 50, r: 10, t: 10, b: 40 }, height: 220, bargap: 0.05,
      xaxis: { title: { text: "coefficient (active)" } }, yaxis: { title: { text: "examples" } },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)"
    }, { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["toImage"] });
  }

  function ready(f) {
    if (document.readyState !== "loading") { f(); } else { document.addEventListener("DOMContentLoaded", f); }
  }
  ready(function () { setUpIndex(); setUpHistogram(); });
})();
