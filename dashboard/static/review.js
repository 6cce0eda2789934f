// The review page: a queue (least confident first) driven from the keyboard.
// j/k next/previous, a approve, r reject, e edit, Ctrl+Enter save, Esc stop editing,
// u undo, 1-9 copy a candidate into the editor.
// The queue is loaded a page at a time (PAGE items, by cursor): the next page is fetched when
// the reviewer comes within PREFETCH items of the end of what is loaded.
"use strict";
(function () {
  const C = window.Captioner;
  const $ = (id) => document.getElementById(id);
  const section = $("review");
  if (!section) return;
  const PAGE = 50, PREFETCH = 10;
  // total: items loaded plus those the server still has after them; cursor: where the next
  // page starts (null when everything is loaded); loading: the page fetch in flight.
  const state = { items: [], index: 0, editing: false, total: 0, exact: true, cursor: null, loading: null };
  const seen = new Set();

  function queueUrl(after) {
    const params = new URLSearchParams(window.location.search);
    const query = new URLSearchParams({ limit: String(PAGE) });
    for (const key of ["job_id", "status", "min_score", "max_score", "q"]) {
      const value = (params.get(key) || "").trim();
      if (value) query.set(key, value);
    }
    if (after) query.set("after", after);
    return "/api/v1/review/queue?" + query.toString();
  }

  function unreviewedQueue() {
    return (new URLSearchParams(window.location.search).get("status") || "unreviewed") === "unreviewed";
  }

  // How many loaded items the server's total still counts: in the unreviewed queue, those not
  // reviewed since they were loaded; in the others, all of them.
  function stillCounted() {
    if (!unreviewedQueue()) return state.items.length;
    return state.items.filter((item) => !item.review || item.review.decision === "undone").length;
  }

  function addPage(data) {
    state.total = state.items.length + Math.max(0, data.total - stillCounted());
    state.exact = data.total_exact !== false;
    for (const item of data.items) if (!seen.has(item.id)) { seen.add(item.id); state.items.push(item); }
    state.cursor = data.next_cursor || null;
    state.total = Math.max(state.total, state.items.length);
  }

  // Fetch the next page once (a second call while one is in flight waits for the same one).
  function loadMore() {
    if (!state.cursor) return Promise.resolve();
    if (!state.loading) {
      state.loading = C.api("GET", queueUrl(state.cursor)).then(addPage)
        .finally(() => { state.loading = null; });
    }
    return state.loading;
  }

  function prefetch() {
    if (state.cursor && state.index >= state.items.length - PREFETCH) {
      loadMore().then(showPosition).catch(() => {});
    }
  }

  // Move to the next item, loading the next page first when this is the last one loaded.
  async function advance() {
    if (state.index >= state.items.length - 1 && state.cursor) await loadMore();
    if (state.index < state.items.length - 1) state.index++;
  }

  // Word-level diff (longest common subsequence) of the model's text and the reviewer's.
  function diffWords(before, after) {
    const a = before.split(/\s+/).filter(Boolean), b = after.split(/\s+/).filter(Boolean);
    const n = a.length, m = b.length;
    const dp = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
    for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
      dp[i][j] = a[i] === b[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
    const out = []; let i = 0, j = 0;
    while (i < n || j < m) {
      if (i < n && j < m && a[i] === b[j]) { out.push(["same", a[i]]); i++; j++; }
      else if (j < m && (i >= n || dp[i][j + 1] >= dp[i + 1][j])) { out.push(["ins", b[j]]); j++; }
      else { out.push(["del", a[i]]); i++; }
    }
    return out;
  }

  function renderDiff(modelText, reviewText) {
    const box = $("review-diff");
    box.replaceChildren();
    if (reviewText === null || reviewText === undefined || reviewText === modelText) return;
    for (const [kind, word] of diffWords(modelText || "", reviewText)) {
      box.append(kind === "same" ? document.createTextNode(word) : C.el(kind, word), " ");
    }
  }

  function current() { return state.items[state.index]; }

  let historyLoads = 0;
  async function loadHistory(item) {
    const list = $("review-history");
    list.replaceChildren();
    const load = ++historyLoads;
    const data = await C.api("GET", `/api/v1/images/${item.id}/reviews`);
    // Moving on quickly (j, k) starts newer loads: a late answer for another image is dropped.
    if (load !== historyLoads) return;
    for (const r of data.items) {
      const li = C.el("li");
      li.append(C.el("span", r.decision, "decision-" + r.decision), " by ", C.el("span", r.reviewer || "?"),
        " at ", C.el("time", new Date(r.created_at).toLocaleString()));
      if (r.text) li.append(": ", C.el("q", r.text));
      if (r.undoes_id) li.append(" (undo)");
      list.append(li);
    }
  }

  function position() {
    return `${state.index + 1} of ${state.total.toLocaleString("en")}${state.exact ? "" : "+"}`;
  }

  // After a page arrives in the background: the count only, leaving any status text after it.
  function showPosition() {
    const box = $("review-position");
    if (!current()) return;
    const rest = box.textContent.includes(" · ") ? box.textContent.slice(box.textContent.indexOf(" · ")) : "";
    box.textContent = position() + rest;
  }

  function render() {
    const item = current();
    $("review-empty").hidden = !!item;
    section.hidden = !item;
    if (!item) { $("review-position").textContent = ""; return; }
    $("review-position").textContent = position();
    prefetch();
    $("review-image").src = item.content_url;
    $("review-image").alt = item.original_name;
    $("review-name").textContent = `${item.original_name} (image ${item.id}, job ${item.job_id})`;
    const caption = item.caption || { text: "", score: null, candidates: [] };
    $("review-score").textContent = caption.score === null ? "n/a" : caption.score.toFixed(3);
    $("review-model-text").textContent = caption.text;
    const cands = $("review-candidates");
    cands.replaceChildren();
    caption.candidates.forEach((c, k) => {
      const li = C.el("li", `${c.text}` + (c.score === null || c.score === undefined ? "" : ` (${Number(c.score).toFixed(3)})`));
      li.title = `press ${k + 1} to copy into the editor`;
      cands.append(li);
    });
    const review = item.review && item.review.decision !== "undone" ? item.review : null;
    $("review-current").textContent = review ? review.decision + (review.text ? `: ${review.text}` : "") : "not reviewed";
    section.dataset.imageId = item.id;
    section.dataset.decision = review ? review.decision : "";
    stopEditing();
    renderDiff(caption.text, review ? review.text : null);
    loadHistory(item).catch(() => {});
  }

  function startEditing(text) {
    const item = current(); if (!item) return;
    const editor = $("review-editor");
    const review = item.review && item.review.text ? item.review.text : null;
    editor.value = text !== undefined ? text : (review || (item.caption ? item.caption.text : ""));
    editor.hidden = false; state.editing = true;
    editor.focus();
    renderDiff(item.caption ? item.caption.text : "", editor.value);
  }

  function stopEditing() { const editor = $("review-editor"); editor.hidden = true; state.editing = false; editor.blur(); }

  async function refreshItem(item) {
    const fresh = await C.api("GET", `/api/v1/images/${item.id}`);
    state.items[state.items.indexOf(item)] = fresh;
  }

  async function decide(decision, text) {
    const item = current(); if (!item) return;
    const body = { decision };
    if (text !== undefined) body.text = text;
    if (item.caption) body.caption_id = item.caption.id;
    try {
      await C.api("POST", `/api/v1/images/${item.id}/reviews`, body);
      await refreshItem(item);
      await advance();
      render();
      $("review-position").textContent += ` · saved ${decision}`;
    } catch (e) { $("review-position").textContent = "Error: " + e.message; }
  }

  async function undo() {
    const item = current(); if (!item) return;
    try {
      await C.api("POST", `/api/v1/images/${item.id}/reviews/undo`);
      await refreshItem(item);
      render();
      $("review-position").textContent += " · undone";
    } catch (e) { $("review-position").textContent = "Error: " + e.message; }
  }

  function save() {
    const text = $("review-editor").value.trim();
    if (!text) return;
    const item = current();
    decide(item && item.caption && text === item.caption.text ? "approved" : "corrected", text);
  }

  const actions = {
    approve: () => decide("approved"), reject: () => decide("rejected"), edit: () => startEditing(),
    save: () => (state.editing ? save() : startEditing()), undo,
  };
  for (const button of section.querySelectorAll("button[data-action]")) button.addEventListener("click", () => actions[button.dataset.action]());
  $("review-editor").addEventListener("input", () => { const item = current(); renderDiff(item && item.caption ? item.caption.text : "", $("review-editor").value); });

  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && state.editing) { event.preventDefault(); save(); return; }
    if (event.key === "Escape" && state.editing) { event.preventDefault(); stopEditing(); return; }
    const target = event.target;
    if (state.editing || (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT"))) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const item = current();
    switch (event.key) {
      case "j": {
        const before = state.index;
        advance().then(() => { if (state.index !== before) render(); })
          .catch((e) => { $("review-position").textContent = "Error: " + e.message; });
        break;
      }
      case "k": if (state.index > 0) { state.index--; render(); } break;
      case "a": actions.approve(); break;
      case "r": actions.reject(); break;
      case "e": event.preventDefault(); startEditing(); break;
      case "u": undo(); break;
      default:
        if (/^[1-9]$/.test(event.key) && item && item.caption) {
          const cand = item.caption.candidates[Number(event.key) - 1];
          if (cand) { event.preventDefault(); startEditing(cand.text); }
        }
        return;
    }
    event.preventDefault();
  });

  C.api("GET", queueUrl(null)).then((data) => { addPage(data); section.dataset.ready = "1"; render(); })
    .catch((e) => { $("review-position").textContent = "Error: " + e.message; });
})();
