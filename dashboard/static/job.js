// Live progress of one job: polls the API every 1.5 s until the job is finished or cancelled.
"use strict";
(function () {
  const section = document.getElementById("progress");
  if (!section) return;
  const jobId = section.dataset.jobId;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  async function poll() {
    try {
      const response = await fetch(`/api/v1/jobs/${jobId}`, { credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
      if (!response.ok) return;
      const job = await response.json();
      document.getElementById("job-status").textContent = job.status;
      const bar = document.getElementById("job-progress");
      bar.max = job.progress.total || 1; bar.value = job.progress.done;
      for (const span of document.querySelectorAll("[data-count]")) span.textContent = job.progress[span.dataset.count];
      section.dataset.status = job.status;
      if (job.status === "finished" || job.status === "cancelled") return;
    } catch (e) { /* network blip: try again */ }
    setTimeout(poll, 1500);
  }
  poll();
})();
