// "Try one image": upload through the interactive queue, then poll until the caption is in.
// The job is a try (`POST /api/v1/try`): it has its own page but is not in the jobs lists.
"use strict";
(function () {
  const C = window.Captioner;
  const form = document.getElementById("try-form");
  if (!form) return;
  const status = document.getElementById("try-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData();
    if (form.files.files[0]) data.set("file", form.files.files[0]);
    status.textContent = "Uploading…";
    document.getElementById("try-caption").textContent = "";
    document.getElementById("try-candidates").replaceChildren();
    try {
      const job = await C.api("POST", "/api/v1/try", data);
      status.textContent = `Job ${job.id} queued; waiting for a worker…`;
      poll(job.id, Date.now());
    } catch (e) { status.textContent = "Refused: " + e.message; }
  });
  async function poll(jobId, started) {
    try {
      const page = await C.api("GET", `/api/v1/jobs/${jobId}/images?limit=1`);
      const image = page.items[0];
      if (image && image.status === "captioned" && image.caption) {
        const img = document.getElementById("try-image");
        img.src = image.content_url; img.alt = image.original_name; img.hidden = false;
        document.getElementById("try-caption").textContent = image.caption.text;
        const list = document.getElementById("try-candidates");
        for (const c of image.caption.candidates) list.append(C.el("li", `${c.text} (${Number(c.score).toFixed(3)})`));
        status.textContent = `Captioned in ${((Date.now() - started) / 1000).toFixed(1)} s.`;
        return;
      }
      if (image && image.status === "failed") { status.textContent = "Failed: " + image.failure_reason; return; }
      status.textContent = `Job ${jobId}: ${image ? image.status : "queued"}…`;
    } catch (e) { status.textContent = "Error: " + e.message; }
    setTimeout(() => poll(jobId, started), 700);
  }
})();
