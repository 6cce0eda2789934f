// Background exports: start one from the form, list yours with live progress (polling the API
// every 1.5 s while one is queued or running) and a download link once it is done.
"use strict";
(function () {
  const form = document.getElementById("export-form");
  const table = document.getElementById("exports-table");
  if (!form || !table) return;
  const body = table.querySelector("tbody");
  const empty = document.getElementById("exports-empty");
  const message = document.getElementById("export-message");
  const el = (tag, text, cls) => Captioner.el(tag, text, cls);
  let timer = null;

  function size(bytes) {
    if (bytes === null || bytes === undefined) return "";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let n = bytes, unit = 0;
    while (n >= 1000 && unit < units.length - 1) { n /= 1000; unit += 1; }
    return `${unit ? n.toFixed(1) : n} ${units[unit]}`;
  }

  function progressCell(exp) {
    const td = el("td");
    const bar = el("progress");
    bar.max = exp.rows_total || 1;
    bar.value = exp.status === "done" ? bar.max : Math.min(exp.rows_done, bar.max);
    td.append(bar, " ", el("span", `${exp.rows_done.toLocaleString()} / ${exp.rows_total.toLocaleString()} rows`, "rows"));
    return td;
  }

  function fileCell(exp) {
    const td = el("td");
    if (exp.download_url) {
      const link = el("a", exp.file_name, "download");
      link.href = exp.download_url;
      link.setAttribute("download", exp.file_name);
      td.append(link);
      if (exp.missing_images) td.append(el("div", `${exp.missing_images} images missing from the store`));
    } else if (exp.error) {
      td.append(el("span", exp.error, "error decision-rejected"));
    }
    return td;
  }

  function row(exp) {
    const tr = el("tr");
    tr.dataset.exportId = exp.id;
    tr.dataset.status = exp.status;
    const started = new Date(exp.created_at);
    tr.append(
      el("td", String(exp.id)),
      el("td", exp.job_id === null ? "all" : String(exp.job_id)),
      el("td", exp.format),
      el("td", exp.which),
      el("td", exp.status, "status"),
      progressCell(exp),
      el("td", size(exp.size_bytes)),
      el("td", started.toLocaleString()),
      fileCell(exp),
    );
    return tr;
  }

  async function refresh() {
    clearTimeout(timer);
    let open = true;
    try {
      const page = await Captioner.api("GET", "/api/v1/exports?limit=50");
      body.replaceChildren(...page.items.map(row));
      empty.hidden = page.items.length > 0;
      open = page.items.some((exp) => exp.status === "queued" || exp.status === "running");
    } catch (e) { /* network blip: try again */ }
    if (open) timer = setTimeout(refresh, 1500);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const request = { format: data.get("format"), which: data.get("which") };
    if (data.get("job_id")) request.job_id = Number(data.get("job_id"));
    try {
      const exp = await Captioner.api("POST", "/api/v1/exports", request);
      message.className = "flash ok";
      message.textContent = `Export ${exp.id} started.`;
    } catch (e) {
      message.className = "flash error";
      message.textContent = `Refused: ${e.message}`;
    }
    refresh();
  });

  refresh();
})();
