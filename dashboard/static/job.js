// A job's page. While the job runs it polls the API every 1.5 s: the progress, the status
// (the Cancel button goes once the job is finished or cancelled) and the rows of the images
// shown (status, thumbnail, caption, review), until the job ends. Reviewers approve by score
// in two steps: a preview (how many, and a sample of the lowest scoring), then a confirm;
// the approval can then be undone as one action.
"use strict";
(function () {
  const C = window.Captioner;
  const $ = (id) => document.getElementById(id);
  const section = $("progress");
  if (!section) return;
  const jobId = section.dataset.jobId;
  const table = $("images-table");
  const ENDED = ["finished", "cancelled"];
  const POLL_MS = 1500;

  // A model's confidence in [0, 1] as a percentage; older log-probability scores as they are.
  function scoreText(score) {
    if (score === null || score === undefined) return "";
    const s = Number(score);
    return s >= 0 && s <= 1 ? `${Math.round(s * 100)}%` : s.toFixed(3);
  }

  function thumbnail(image) {
    const img = document.createElement("img");
    img.className = "thumb"; img.loading = "lazy"; img.alt = image.original_name; img.src = image.thumbnail_url || image.content_url;
    img.addEventListener("load", () => { if (img.naturalWidth && img.naturalWidth < 64) img.classList.add("pixelated"); });
    return img;
  }

  function cells(tr) {
    if (tr.children.length === 7) return tr.children;
    tr.replaceChildren(...Array.from({ length: 7 }, () => document.createElement("td")));
    tr.children[0].className = "thumb-cell";
    tr.children[3].className = "image-status";
    tr.children[4].className = "image-caption";
    tr.children[5].className = "image-review";
    tr.children[6].className = "image-failure";
    return tr.children;
  }

  // One row of the images table, updated in place (a thumbnail already shown is kept).
  function fillRow(tr, image) {
    const td = cells(tr);
    tr.dataset.imageId = image.id; tr.dataset.status = image.status;
    const img = td[0].querySelector("img");
    if (image.status === "captioned" && !img) td[0].replaceChildren(thumbnail(image));
    else if (image.status !== "captioned" && img) td[0].replaceChildren();
    td[1].textContent = image.id; td[2].textContent = image.original_name; td[3].textContent = image.status;
    td[4].replaceChildren();
    if (image.caption) {
      td[4].append(image.caption.text);
      const score = scoreText(image.caption.score);
      if (score) td[4].append(" ", C.el("span", `(${score})`, "score"));
    }
    td[5].replaceChildren();
    if (image.review) td[5].append(C.el("span", image.review.decision, "decision-" + image.review.decision));
    else if (image.caption) td[5].textContent = "unreviewed";
    td[6].textContent = image.failure_reason || "";
  }

  function renderRows(page) {
    const body = table.tBodies[0];
    const rows = new Map();
    for (const tr of body.querySelectorAll("tr[data-image-id]")) rows.set(tr.dataset.imageId, tr);
    const shown = page.items.map((image) => {
      const tr = rows.get(String(image.id)) || document.createElement("tr");
      fillRow(tr, image);
      return tr;
    });
    if (!shown.length) {
      const empty = document.createElement("tr"); empty.className = "empty";
      const td = document.createElement("td"); td.colSpan = 7;
      td.textContent = "No images" + (table.dataset.status ? ` with status ${table.dataset.status}` : "") + ".";
      empty.append(td); shown.push(empty);
    }
    body.replaceChildren(...shown);
    $("images-total").textContent = page.total;
    const more = $("images-more");
    if (page.next_after) {
      const query = new URLSearchParams({ after: String(page.next_after) });
      if (table.dataset.status) query.set("status", table.dataset.status);
      more.href = "?" + query.toString();
    }
    more.hidden = !page.next_after;
  }

  async function refreshRows() {
    const query = new URLSearchParams({ limit: table.dataset.limit || "100" });
    if (table.dataset.after) query.set("after", table.dataset.after);
    if (table.dataset.status) query.set("status", table.dataset.status);
    renderRows(await C.api("GET", `/api/v1/jobs/${jobId}/images?` + query.toString()));
  }

  function showJob(job) {
    $("job-status").textContent = job.status;
    const bar = $("job-progress");
    bar.max = job.progress.total || 1; bar.value = job.progress.done;
    for (const span of document.querySelectorAll("[data-count]")) span.textContent = job.progress[span.dataset.count];
    section.dataset.status = job.status;
    const cancel = $("job-cancel"), retry = $("job-retry");
    if (cancel && ENDED.includes(job.status)) cancel.hidden = true;
    if (retry) retry.hidden = !job.progress.failed;
  }

  async function poll() {
    let ended = false;
    try {
      const job = await C.api("GET", `/api/v1/jobs/${jobId}`);
      showJob(job);
      ended = ENDED.includes(job.status);
      await refreshRows();
    } catch (e) { /* network blip: try again */ }
    if (ended) section.dataset.live = "ended";
    else setTimeout(poll, POLL_MS);
  }

  if (ENDED.includes(section.dataset.status)) section.dataset.live = "ended";
  else poll();

  // --- approve by score: preview, confirm, undo --------------------------------------------

  const approve = $("approve");
  if (!approve) return;
  const SAMPLE = 12;
  const state = { threshold: null, batch: null };

  function sampleTile(image) {
    const li = C.el("li", undefined, "tile");
    li.dataset.imageId = image.id;
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = image.original_name; img.src = image.thumbnail_url || image.content_url;
    img.addEventListener("load", () => { if (img.naturalWidth && img.naturalWidth < 128) img.classList.add("pixelated"); });
    const meta = C.el("p", undefined, "tile-meta");
    meta.append(C.el("span", image.original_name), C.el("span", scoreText(image.caption && image.caption.score), "score"));
    li.append(img, C.el("p", image.caption ? image.caption.text : "", "tile-caption"), meta);
    return li;
  }

  function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

  function showPreview(data) {
    const n = data.count, t = data.min_score;
    $("approve-count").textContent = n
      ? `${plural(n, "unreviewed caption")}${data.count_exact ? "" : " (the most one approval takes)"} would be approved: score ≥ ${t}.`
      : `No unreviewed caption of this job scores ${t} or more.`;
    const shown = data.sample.length;
    $("approve-sample-note").textContent = !shown ? ""
      : shown === n ? "All of them, the lowest scoring (the closest to the threshold) first:"
      : `The ${shown} lowest scoring of them, the closest to the threshold:`;
    $("approve-sample").replaceChildren(...data.sample.map(sampleTile));
    const confirm = $("approve-confirm");
    confirm.textContent = `Approve ${plural(n, "caption")}`;
    confirm.hidden = n === 0; confirm.disabled = false;
    $("approve-preview").hidden = false;
  }

  $("approve-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("approve-min-score").value.trim();
    const threshold = Number(value);
    $("approve-done").hidden = true;
    if (value === "" || !Number.isFinite(threshold)) {
      $("approve-count").textContent = "Give a number for the score threshold.";
      $("approve-sample-note").textContent = ""; $("approve-sample").replaceChildren();
      $("approve-confirm").hidden = true; $("approve-preview").hidden = false;
      return;
    }
    try {
      const query = new URLSearchParams({ min_score: String(threshold), sample: String(SAMPLE) });
      const data = await C.api("GET", `/api/v1/jobs/${jobId}/approve-above?` + query.toString());
      state.threshold = threshold;
      showPreview(data);
    } catch (e) {
      $("approve-count").textContent = "Refused: " + e.message;
      $("approve-confirm").hidden = true; $("approve-preview").hidden = false;
    }
  });

  $("approve-dismiss").addEventListener("click", () => { $("approve-preview").hidden = true; });

  $("approve-confirm").addEventListener("click", async () => {
    const button = $("approve-confirm");
    button.disabled = true;
    try {
      const data = await C.api("POST", `/api/v1/jobs/${jobId}/approve-above`, { min_score: state.threshold });
      state.batch = data.batch;
      $("approve-preview").hidden = true;
      $("approve-result").textContent = `Approved ${plural(data.count, "caption")} scoring ${state.threshold} or more.`;
      $("approve-undo").hidden = !data.batch; $("approve-undo").disabled = false;
      $("approve-done").hidden = false;
      refreshRows().catch(() => {});
    } catch (e) {
      $("approve-count").textContent = "Refused: " + e.message;
      button.disabled = false;
    }
  });

  $("approve-undo").addEventListener("click", async () => {
    const button = $("approve-undo");
    button.disabled = true;
    try {
      const data = await C.api("POST", `/api/v1/jobs/${jobId}/approve-undo`, { batch: state.batch });
      state.batch = null;
      button.hidden = true;
      $("approve-result").textContent = `Undone: ${plural(data.count, "approval")} taken back; those captions await review again.`;
      refreshRows().catch(() => {});
    } catch (e) {
      $("approve-result").textContent = "Could not undo: " + e.message;
      button.disabled = false;
    }
  });
})();
