// The review grid: a page of unreviewed captions as thumbnails, least confident first, walked
// by the queue's cursor (never an offset). Select with the mouse (click, Shift+click for a
// range) or the keyboard (arrows move, Space selects, Shift+arrows extend, Ctrl+a the whole
// page, Esc clears), then approve the selection (a, or the button) in one call. Approved
// tiles stay on the page, marked; a tile reviewed elsewhere meanwhile is marked skipped.
"use strict";
(function () {
  const C = window.Captioner;
  const $ = (id) => document.getElementById(id);
  const list = $("grid");
  if (!list) return;
  const PAGE = 48, TINY = 128;
  // cursors[i]: where page i starts (null for the first); items: the page shown; done: image
  // id -> "approved" | "skipped" for tiles decided on this page; anchor: where a Shift range
  // starts; busy: an approval in flight.
  const state = {
    cursors: [null], page: 0, next: null, items: [], total: 0, exact: true,
    focus: 0, anchor: null, selected: new Set(), done: new Map(), busy: false,
  };

  function queueUrl(after) {
    const params = new URLSearchParams(window.location.search);
    const query = new URLSearchParams({ status: "unreviewed", limit: String(PAGE) });
    for (const key of ["job_id", "min_score", "max_score", "q"]) {
      const value = (params.get(key) || "").trim();
      if (value) query.set(key, value);
    }
    if (after) query.set("after", after);
    return "/api/v1/review/queue?" + query.toString();
  }

  function message(text) { $("grid-message").textContent = text; }

  async function load(page) {
    let data;
    try { data = await C.api("GET", queueUrl(state.cursors[page])); }
    catch (e) { message("Could not load the queue: " + e.message); return; }
    state.page = page; state.items = data.items; state.next = data.next_cursor || null;
    state.cursors.length = page + 1;
    if (state.next) state.cursors.push(state.next);
    state.total = data.total; state.exact = data.total_exact !== false;
    state.focus = 0; state.anchor = null; state.selected.clear(); state.done.clear();
    render();
    list.dataset.ready = "1"; list.dataset.page = String(page + 1);
  }

  function tile(item, index) {
    const li = C.el("li", undefined, "tile");
    li.setAttribute("role", "option");
    li.dataset.index = String(index); li.dataset.imageId = String(item.id);
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = item.original_name; img.src = item.thumbnail_url || item.content_url; img.draggable = false;
    img.addEventListener("load", () => { if (img.naturalWidth && img.naturalWidth < TINY) img.classList.add("pixelated"); });
    const meta = C.el("p", undefined, "tile-meta");
    const raw = item.caption && item.caption.score !== null ? Number(item.caption.score) : null;
    const score = raw === null ? "" : raw >= 0 && raw <= 1 ? `${Math.round(raw * 100)}%` : raw.toFixed(3);
    meta.append(C.el("span", score, "score"), C.el("span", "", "tile-state"));
    li.title = item.original_name;
    li.append(img, C.el("p", item.caption ? item.caption.text : "", "tile-caption"), meta);
    return li;
  }

  function render() {
    list.replaceChildren(...state.items.map(tile));
    $("grid-empty").hidden = state.items.length > 0;
    paint();
  }

  // Selection, focus, done marks, counts and buttons, from the state.
  function paint() {
    for (const li of list.children) {
      const item = state.items[Number(li.dataset.index)];
      const done = state.done.get(item.id);
      li.setAttribute("aria-selected", state.selected.has(item.id) ? "true" : "false");
      li.classList.toggle("focused", Number(li.dataset.index) === state.focus);
      li.classList.toggle("done", !!done);
      const label = li.querySelector(".tile-state");
      label.textContent = done === "approved" ? "approved" : done === "skipped" ? "reviewed elsewhere" : "";
      label.className = "tile-state" + (done ? " " + done : "");
    }
    const n = state.selected.size;
    $("grid-selected").textContent = `${n} selected`;
    $("grid-approve").disabled = n === 0 || state.busy;
    $("grid-prev").disabled = state.page === 0;
    $("grid-next").disabled = !state.next;
    const total = `${state.total}${state.exact ? "" : "+"}`;
    $("grid-position").textContent = `Page ${state.page + 1} · ${state.items.length} shown · ${total} awaiting review`;
  }

  function selectable(index) {
    const item = state.items[index];
    return !!item && !state.done.has(item.id) && !!item.caption;
  }

  function toggle(index) {
    if (!selectable(index)) return;
    const id = state.items[index].id;
    if (state.selected.has(id)) state.selected.delete(id); else state.selected.add(id);
  }

  function selectRange(from, to) {
    const [lo, hi] = from <= to ? [from, to] : [to, from];
    for (let i = lo; i <= hi; i++) if (selectable(i)) state.selected.add(state.items[i].id);
  }

  function focusTile(index, extend) {
    if (!state.items.length) return;
    const target = Math.max(0, Math.min(state.items.length - 1, index));
    if (extend) {
      if (state.anchor === null) state.anchor = state.focus;
      selectRange(state.anchor, target);
    }
    state.focus = target;
    paint();
    const li = list.children[target];
    if (li) li.scrollIntoView({ block: "nearest" });
  }

  // Tiles per row, as laid out now.
  function columns() {
    const tiles = list.children;
    if (!tiles.length) return 1;
    const top = tiles[0].offsetTop;
    let n = 0;
    while (n < tiles.length && tiles[n].offsetTop === top) n++;
    return Math.max(1, n);
  }

  async function approveSelected() {
    if (state.busy) return;
    const picks = state.items.filter((item) => state.selected.has(item.id))
      .map((item) => ({ image_id: item.id, caption_id: item.caption.id }));
    if (!picks.length) { message("Select captions first (Space, or a click)."); return; }
    state.busy = true; paint();
    try {
      const data = await C.api("POST", "/api/v1/review/approve", { items: picks });
      for (const review of data.items) state.done.set(review.image_id, "approved");
      for (const id of data.skipped) state.done.set(id, "skipped");
      const shared = data.shared || [];
      for (const id of shared) state.done.set(id, "approved");  // same content, approved with it
      // Copies on this page left this queue too; those elsewhere are in other jobs' queues.
      const sharedHere = state.items.filter((item) => shared.includes(item.id)).length;
      state.selected.clear(); state.anchor = null;
      state.total = Math.max(0, state.total - data.items.length - sharedHere);
      const skipped = data.skipped.length ? `; ${data.skipped.length} skipped (reviewed meanwhile)` : "";
      const copies = shared.length ? `; ${shared.length} identical image${shared.length === 1 ? "" : "s"} too` : "";
      message(`Approved ${data.items.length} caption${data.items.length === 1 ? "" : "s"}${copies}${skipped}.`);
    } catch (e) {
      message("Not approved: " + e.message);
    } finally {
      state.busy = false; paint();
    }
  }

  list.addEventListener("click", (event) => {
    const li = event.target.closest(".tile");
    if (!li) return;
    const index = Number(li.dataset.index);
    if (event.shiftKey && state.anchor !== null) selectRange(state.anchor, index);
    else { toggle(index); state.anchor = index; }
    state.focus = index;
    paint();
  });

  function selectPage() {
    state.items.forEach((_, i) => { if (selectable(i)) state.selected.add(state.items[i].id); });
    paint();
  }

  function clear() { state.selected.clear(); state.anchor = null; paint(); }

  const MOVES = { ArrowLeft: () => -1, ArrowRight: () => 1, ArrowUp: () => -columns(), ArrowDown: () => columns() };

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target instanceof HTMLElement && target.closest("input, textarea, select, [contenteditable]")) return;
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "a") {
      event.preventDefault(); selectPage(); return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (MOVES[event.key]) {
      event.preventDefault();
      if (!event.shiftKey) state.anchor = null;
      focusTile(state.focus + MOVES[event.key](), event.shiftKey);
    } else if (event.key === " ") {
      event.preventDefault(); toggle(state.focus); state.anchor = state.focus; paint();
    } else if (event.key === "a") {
      event.preventDefault(); approveSelected();
    } else if (event.key === "Escape") {
      clear();
    } else if (event.key === "n" && state.next) {
      load(state.page + 1);
    } else if (event.key === "p" && state.page > 0) {
      load(state.page - 1);
    }
  });

  $("grid-approve").addEventListener("click", approveSelected);
  $("grid-select-page").addEventListener("click", selectPage);
  $("grid-clear").addEventListener("click", clear);
  $("grid-next").addEventListener("click", () => { if (state.next) load(state.page + 1); });
  $("grid-prev").addEventListener("click", () => { if (state.page > 0) load(state.page - 1); });
  load(0);
})();
