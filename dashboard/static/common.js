// Shared helpers: JSON API calls with the session's CSRF token. Data from the server is only
// ever put into the page with textContent, never as HTML.
"use strict";
window.Captioner = {
  csrf() { return document.querySelector('meta[name="csrf-token"]').content; },
  async api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { "X-CSRF-Token": this.csrf() } };
    if (body instanceof FormData) { init.body = body; }
    else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
    const response = await fetch(path, init);
    const data = response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) { throw new Error((data && data.message) || response.statusText); }
    return data;
  },
  el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = text; if (cls) e.className = cls; return e; },
};
