// The review page: a queue (least confident first) driven from the keyboard.
// j/k next/previous, a approve, r reject, e edit (the caption text selected), Enter or
// Ctrl+Enter save, Esc stop editing, u or Backspace undo the last decision of this session,
// 1-9 put the n-th alternative into the editor, + / - / 0 zoom in, out, back to fit.
// One decision per item: while a decision (or an undo) is in flight every other decision key
// is ignored, so a second `a` before the next item is shown sends nothing.
// The queue is loaded a page at a time (PAGE items, by cursor): the next page is fetched when
// the reviewer comes within PREFETCH items of the end of what is loaded. Past the last item
// comes the end screen, where a decision key has nothing to act on.
// In the unreviewed queue the item shown is claimed for this reviewer (renewed while it stays
// on screen), so other reviewers' queues leave it out; an item another reviewer holds, or one
// reviewed meanwhile (by someone else, or by a decision on an image of the same content), is
// dropped from the list and the next one shown. Claims are best effort: without them (Redis
// down) reviewing goes on.
"use strict";
(function () {
  const C = window.Captioner;
  const $ = (id) => document.getElementById(id);
  const section = $("review");
  if (!section) return;
  const PAGE = 50, PREFETCH = 10;
  const TINY = 128, MIN_ZOOM = 1, MAX_ZOOM = 16, ZOOM_STEP = 1.25;
  // total: items loaded plus those the server still has after them; cursor: where the next
  // page starts (null when everything is loaded); loading: the page fetch in flight; busy: a
  // decision or undo in flight; decided: ids of the items decided in this page's session, in
  // order (what u takes back); index === items.length is the end screen.
  const state = {
    items: [], index: 0, editing: false, total: 0, exact: true, cursor: null, loading: null,
    busy: false, decided: [],
  };
  const seen = new Set();

  // The first page claims its first item for this reviewer; every page leaves out the items
  // other reviewers hold (the unreviewed queue only; the server ignores both elsewhere).
  function queueUrl(after) {
    const params = new URLSearchParams(window.location.search);
    const query = new URLSearchParams({ limit: String(PAGE) });
    for (const key of ["job_id", "status", "min_score", "max_score", "q"]) {
      const value = (params.get(key) || "").trim();
      if (value) query.set(key, value);
    }
    if (after) query.set("after", after);
    query.set(after ? "skip_claimed" : "claim", "true");
    return "/api/v1/review/queue?" + query.toString();
  }

  function unreviewedQueue() {
    return (new URLSearchParams(window.location.search).get("status") || "unreviewed") === "unreviewed";
  }

  function isReviewed(item) { return !!item.review && item.review.decision !== "undone"; }

  // How many loaded items the server's total still counts: in the unreviewed queue, those not
  // reviewed since they were loaded; in the others, all of them.
  function stillCounted() {
    if (!unreviewedQueue()) return state.items.length;
    return state.items.filter((item) => !isReviewed(item)).length;
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

  // --- claims ------------------------------------------------------------------------------
  // claimed: the id of the item this page holds a claim on; renew: the timer that renews it.
  const claims = { claimed: null, renew: null };

  // PUT (not POST: claiming again only renews it). Resolves to the HTTP status.
  async function putClaim(id) {
    const response = await fetch(`/api/v1/images/${id}/claim`, {
      method: "PUT", credentials: "same-origin", headers: { "X-CSRF-Token": C.csrf() },
    });
    const data = response.ok ? await response.json().catch(() => null) : null;
    if (response.ok && data && data.claimed && id === claims.claimed) {
      clearTimeout(claims.renew);
      claims.renew = setTimeout(() => renewClaim(id), Math.max(5, data.expires_in / 2) * 1000);
    }
    return response.status;
  }

  // While the item stays on screen its claim is renewed; a failure changes nothing here.
  function renewClaim(id) {
    if (claims.claimed === id && current() && current().id === id && !isReviewed(current())) {
      putClaim(id).catch(() => {});
    }
  }

  // Drop the item at `index` from the list: another reviewer has it, or it was reviewed.
  function drop(index) {
    state.items.splice(index, 1);
    state.total = Math.max(state.items.length, state.total - 1);
  }

  // Claim the item about to be shown; on a 409 drop it and try the next (loading the next
  // page when the list runs out). Other failures leave the item shown, unclaimed.
  async function claimCurrent() {
    if (!unreviewedQueue()) return;
    for (;;) {
      if (state.index >= state.items.length && state.cursor) await loadMore();
      const item = current();
      if (!item || isReviewed(item)) return;
      claims.claimed = item.id;
      let status;
      try { status = await putClaim(item.id); } catch (e) { return; }
      if (status !== 409) return;
      claims.claimed = null;
      drop(state.index);
    }
  }

  function prefetch() {
    if (state.cursor && state.index >= state.items.length - PREFETCH) {
      loadMore().then(showPosition).catch(() => {});
    }
  }

  // Move to the next item, loading the next page first when this is the last one loaded;
  // `pastEnd` (after a decision on the last item) moves on to the end screen.
  async function advance(pastEnd) {
    if (state.index >= state.items.length - 1 && state.cursor) await loadMore();
    if (state.index < state.items.length - 1 || (pastEnd && state.index < state.items.length)) state.index++;
  }

  // --- the image: fit to its stage, zoom and pan ------------------------------------------
  const stage = $("review-stage"), img = $("review-image");
  const view = { zoom: 1, x: 0, y: 0, drag: null };

  function placeImage() {
    if (!img.naturalWidth || !stage.clientWidth) return;
    const fit = Math.min(stage.clientWidth / img.naturalWidth, stage.clientHeight / img.naturalHeight);
    img.style.width = `${Math.round(img.naturalWidth * fit)}px`;
    img.style.height = `${Math.round(img.naturalHeight * fit)}px`;
    img.classList.toggle("pixelated", Math.max(img.naturalWidth, img.naturalHeight) <= TINY);
    img.style.transform = `translate(-50%, -50%) translate(${view.x}px, ${view.y}px) scale(${view.zoom})`;
    stage.dataset.zoom = String(Math.round(view.zoom * 100) / 100);
  }

  function resetView() { view.zoom = 1; view.x = 0; view.y = 0; placeImage(); }

  // Zoom by `factor` keeping the point (px, py), relative to the stage's centre, still.
  function zoomBy(factor, px = 0, py = 0) {
    const zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, view.zoom * factor));
    const k = zoom / view.zoom;
    view.x = px - (px - view.x) * k; view.y = py - (py - view.y) * k; view.zoom = zoom;
    if (zoom === MIN_ZOOM) { view.x = 0; view.y = 0; }
    if (zoom > 1 && img.dataset.original && !img.src.endsWith(img.dataset.original)) {
      img.src = img.dataset.original;  // same aspect: the fit and the zoom stay as they are
    }
    placeImage();
  }

  img.addEventListener("load", placeImage);
  window.addEventListener("resize", placeImage);
  stage.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = stage.getBoundingClientRect();
    zoomBy(event.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP,
      event.clientX - box.left - box.width / 2, event.clientY - box.top - box.height / 2);
  }, { passive: false });
  stage.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    view.drag = { id: event.pointerId, x: event.clientX - view.x, y: event.clientY - view.y };
    stage.setPointerCapture(event.pointerId);
    stage.classList.add("dragging");
    event.preventDefault();
  });
  stage.addEventListener("pointermove", (event) => {
    if (!view.drag || view.drag.id !== event.pointerId) return;
    view.x = event.clientX - view.drag.x; view.y = event.clientY - view.drag.y;
    placeImage();
  });
  const endDrag = () => { view.drag = null; stage.classList.remove("dragging"); };
  stage.addEventListener("pointerup", endDrag);
  stage.addEventListener("pointercancel", endDrag);
  stage.addEventListener("dblclick", resetView);

  // --- the caption: diff, history ------------------------------------------------------------

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

  // A model caption's score is its confidence in [0, 1], shown as a percentage (rounded down:
  // never "100%" unless certain). Imported captions, and model captions saved before scores
  // were confidences (mean log-probabilities, below 0), show their raw score.
  function percent(p) { return `${Math.floor(p * 100)}%`; }
  function scoreText(caption) {
    if (caption.score === null || caption.score === undefined) return "n/a";
    const s = Number(caption.score);
    return caption.source !== "import" && s >= 0 && s <= 1 ? `confidence ${percent(s)}` : `score ${s.toFixed(3)}`;
  }
  function candidateScoreText(c) {
    if (c.confidence !== null && c.confidence !== undefined) return ` (${percent(Number(c.confidence))})`;
    return c.score === null || c.score === undefined ? "" : ` (${Number(c.score).toFixed(3)})`;
  }

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
  // Not while a move or decision is under way: its index is not on screen yet, and its own
  // render writes the position when it is.
  function showPosition() {
    const box = $("review-position");
    if (!current() || state.busy) return;
    const rest = box.textContent.includes(" · ") ? box.textContent.slice(box.textContent.indexOf(" · ")) : "";
    box.textContent = position() + rest;
  }

  // The end screen: past the last item, or an empty queue. A decision key has nothing to act on.
  function renderDone() {
    const left = state.items.filter((item) => !isReviewed(item)).length;
    const decisions = state.decided.length;
    let summary = "Nothing to review with these filters.";
    if (state.items.length) {
      summary = `${decisions.toLocaleString("en")} decision${decisions === 1 ? "" : "s"} in this session. ` +
        (left ? `${left.toLocaleString("en")} item${left === 1 ? "" : "s"} above still without a decision: press k to go back.`
          : "Nothing left in this queue.");
    }
    $("review-done-summary").textContent = summary;
    $("review-undo-last").hidden = !decisions;
    $("review-position").textContent = state.items.length
      ? `end of the queue (${state.total.toLocaleString("en")}${state.exact ? "" : "+"} items)` : "";
  }

  let shownId = null;
  function render() {
    const item = current();
    $("review-done").hidden = !!item;
    section.hidden = !item;
    section.dataset.imageId = item ? item.id : "";
    if (!item) { shownId = null; stopEditing(); renderDone(); return; }
    $("review-position").textContent = position();
    prefetch();
    if (shownId !== item.id) {
      shownId = item.id;
      view.zoom = 1; view.x = 0; view.y = 0;
      img.removeAttribute("style");
      // The stored preview (fitted within 1024 px) first; the original only once zoomed in.
      img.dataset.original = item.content_url;
      img.src = item.preview_url || item.content_url;
    }
    img.alt = item.original_name;
    $("review-name").textContent = `${item.original_name} (image ${item.id}, job ${item.job_id})`;
    const caption = item.caption || { text: "", score: null, candidates: [] };
    $("review-score").textContent = scoreText(caption);
    $("review-model-text").textContent = caption.text;
    const cands = $("review-candidates");
    cands.replaceChildren();
    caption.candidates.forEach((c, k) => {
      const li = C.el("li", `${c.text}` + candidateScoreText(c));
      li.title = k < 9 ? `press ${k + 1} to put it into the editor` : "click to put it into the editor";
      li.addEventListener("click", () => startEditing(c.text));
      cands.append(li);
    });
    const review = isReviewed(item) ? item.review : null;
    $("review-current").textContent = review ? review.decision + (review.text ? `: ${review.text}` : "") : "not reviewed";
    section.dataset.decision = review ? review.decision : "";
    stopEditing();
    renderDiff(caption.text, review ? review.text : null);
    loadHistory(item).catch(() => {});
  }

  // --- editing: one line, never a newline --------------------------------------------------

  function oneLine(text) { return text.replace(/[\r\n]+/g, " "); }

  function startEditing(text) {
    const item = current(); if (!item || state.busy) return;
    const editor = $("review-editor");
    const review = item.review && item.review.text ? item.review.text : null;
    editor.value = oneLine(text !== undefined ? text : (review || (item.caption ? item.caption.text : "")));
    editor.hidden = false; state.editing = true;
    editor.focus();
    editor.select();
    renderDiff(item.caption ? item.caption.text : "", editor.value);
  }

  function stopEditing() { const editor = $("review-editor"); editor.hidden = true; state.editing = false; editor.blur(); }

  const editor = $("review-editor");
  editor.addEventListener("paste", (event) => {
    const text = event.clipboardData ? event.clipboardData.getData("text/plain") : "";
    event.preventDefault();
    editor.setRangeText(oneLine(text), editor.selectionStart, editor.selectionEnd, "end");
    editor.dispatchEvent(new Event("input"));
  });
  editor.addEventListener("input", () => {
    // Whatever got in (a drop, an input method): newlines become spaces, the caret stays put.
    if (/[\r\n]/.test(editor.value)) {
      const at = editor.selectionStart;
      editor.value = oneLine(editor.value);
      editor.setSelectionRange(Math.min(at, editor.value.length), Math.min(at, editor.value.length));
    }
    const item = current(); renderDiff(item && item.caption ? item.caption.text : "", editor.value);
  });

  // --- decisions ---------------------------------------------------------------------------

  async function refreshItem(item) {
    const fresh = await C.api("GET", `/api/v1/images/${item.id}`);
    state.items[state.items.indexOf(item)] = fresh;
  }

  // Run one decision or undo at a time: a call while another is in flight does nothing.
  async function exclusive(work) {
    if (state.busy) return;
    state.busy = true; section.dataset.busy = "1";
    try { await work(); } catch (e) { $("review-position").textContent = "Error: " + e.message; }
    finally { state.busy = false; delete section.dataset.busy; }
  }

  function decide(decision, text) {
    return exclusive(async () => {
      const item = current(); if (!item) return;
      const body = { decision };
      if (text !== undefined) body.text = text;
      if (item.caption) body.caption_id = item.caption.id;
      await C.api("POST", `/api/v1/images/${item.id}/reviews`, body);
      state.decided.push(item.id);
      await refreshItem(item);
      await advance(true);
      await claimCurrent();
      render();
      if (current()) $("review-position").textContent += ` · saved ${decision}`;
    });
  }

  // Take back the last decision of this session, on the item it was made on, wherever the
  // reviewer is now: go back to that item, then undo there.
  function undo() {
    return exclusive(async () => {
      const id = state.decided.pop();
      if (id === undefined) {
        if (current()) $("review-position").textContent = position() + " · nothing to undo in this session";
        return;
      }
      const index = state.items.findIndex((item) => item.id === id);
      await C.api("POST", `/api/v1/images/${id}/reviews/undo`);
      state.index = index;
      await refreshItem(state.items[index]);
      await claimCurrent();
      render();
      $("review-position").textContent += " · undone";
    });
  }

  function save() {
    const text = oneLine($("review-editor").value).trim();
    if (!text) return;
    const item = current();
    decide(item && item.caption && text === item.caption.text ? "approved" : "corrected", text);
  }

  function pickCandidate(n) {
    const item = current();
    const cand = item && item.caption ? item.caption.candidates[n - 1] : null;
    if (cand) startEditing(cand.text);
    return !!cand;
  }

  const actions = {
    approve: () => decide("approved"), reject: () => decide("rejected"), edit: () => startEditing(),
    save: () => (state.editing ? save() : startEditing()), undo,
  };
  for (const button of section.querySelectorAll("button[data-action]")) button.addEventListener("click", () => actions[button.dataset.action]());
  $("review-undo-last").addEventListener("click", undo);

  function editorKey(event) {
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();  // never a newline; Shift+Enter does nothing
      if (!event.shiftKey) save();
      return true;
    }
    if (event.key === "Escape") { event.preventDefault(); stopEditing(); return true; }
    return false;
  }

  const viewKeys = { "+": () => zoomBy(ZOOM_STEP), "=": () => zoomBy(ZOOM_STEP), "-": () => zoomBy(1 / ZOOM_STEP), "0": resetView };

  // j/k: also one at a time, so that a page load for j and a decision never both move on.
  function move(step) {
    return exclusive(async () => {
      const before = state.index;
      if (step < 0) { if (state.index > 0) state.index--; } else await advance(false);
      if (state.index === before) return;
      await claimCurrent();
      render();
    });
  }

  // Keys that decide act once per press: a key held down (repeat) decides nothing.
  const keys = {
    j: () => move(1), k: () => move(-1), e: () => startEditing(),
    a: (event) => event.repeat || actions.approve(), r: (event) => event.repeat || actions.reject(),
    u: (event) => event.repeat || undo(), Backspace: (event) => event.repeat || undo(),
  };

  document.addEventListener("keydown", (event) => {
    if (state.editing && editorKey(event)) return;
    const target = event.target;
    if (state.editing || (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT"))) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const handler = keys[event.key] || viewKeys[event.key];
    if (handler) { event.preventDefault(); handler(event); return; }
    if (/^[1-9]$/.test(event.key) && !state.busy && pickCandidate(Number(event.key))) event.preventDefault();
  });

  // The first page, its first item claimed (by the server, renewed here); while that is under
  // way no key acts (busy).
  state.busy = true;
  (async () => {
    try {
      addPage(await C.api("GET", queueUrl(null)));
      await claimCurrent();
    } catch (e) {
      state.busy = false;
      $("review-position").textContent = "Error: " + e.message;
      return;
    }
    state.busy = false;
    section.dataset.ready = "1"; render();
  })();
})();
