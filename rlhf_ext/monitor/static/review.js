// The review page. Everything from the queue is model output, so it only ever enters the DOM as textContent.
"use strict";

const POLL_MS = 3000; // a running trainer keeps appending pairs; this is how soon they show up
const KEYS = {
  "1": "left", ArrowLeft: "left", "2": "right", ArrowRight: "right",
  b: "both_bad", B: "both_bad", s: "skip", S: "skip", u: "undo", U: "undo",
};
const LAST_LABEL = {
  flagged: "picked the flagged response", reference: "picked the reference response",
  both_bad: "both bad", skip: "skipped",
};

const sidesById = new Map(); // pair id -> [left side, right side]; kept so an undone pair comes back unchanged
let current = null; // the pair on screen
let lastDecision = null;
let busy = false;
let generation = 0; // bumped by every click, so a poll that started before it cannot paint stale state
// What the last click was refused for (e.g. another tab decided that pair first): shown until the next click, so the
// poll that follows at once to show what is pending now cannot erase it before it is read.
let actionError = "";

const $ = (id) => document.getElementById(id);

// The server's token (any local user can reach 127.0.0.1; only the reviewer has it): from the #token= of the URL the
// server printed, kept for this tab (a reload) and taken out of the address bar. Read again when only the fragment
// changes (the new URL of a restarted server pasted into this tab: browsers do not reload the page for that).
const TOKEN_KEY = "rlhf-ext-review-token";
let TOKEN = "";

function readToken() {
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  let kept = null;
  try { // sessionStorage throws where the browser blocks site storage: the token then lasts until a reload
    if (given) sessionStorage.setItem(TOKEN_KEY, given);
    kept = sessionStorage.getItem(TOKEN_KEY);
  } catch (e) { /* keep what this page already has */ }
  if (given) history.replaceState(null, "", location.pathname + location.search);
  TOKEN = given || kept || TOKEN;
}
readToken();
window.addEventListener("hashchange", () => { readToken(); refresh(); });

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Errors name what went wrong: the server out of reach, a reply that is not JSON, or the server's own message.
async function api(path, body) {
  const init = body === undefined ? { cache: "no-store", headers: { "X-Review-Token": TOKEN } } : {
    method: "POST", cache: "no-store",
    headers: { "Content-Type": "application/json", "X-Review-Token": TOKEN }, body: JSON.stringify(body),
  };
  let res, text;
  try {
    res = await fetch(path, init);
    text = await res.text();
  } catch (e) {
    throw new Error(`Cannot reach the review server (${e.message}). Decisions so far are saved.`);
  }
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) { // the server answered, so "cannot reach" would send the reviewer looking in the wrong place
    const where = `HTTP ${res.status} for ${path.split("?")[0]}`;
    throw new Error(`The review server sent invalid JSON (${where}: ${e.message}). Its terminal may say why; ` +
      "decisions so far are saved.");
  }
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

// Random left/right per pair: a reviewer who tends to favour one side (or the label) must not bias the data.
function sidesFor(id) {
  if (!sidesById.has(id)) {
    sidesById.set(id, Math.random() < 0.5 ? ["flagged", "reference"] : ["reference", "flagged"]);
  }
  return sidesById.get(id);
}

// A message's content as a list of parts ([{"type": "text", "text": ...}, {"type": "image"}], as newer chat templates
// and VLM datasets write it): the text parts, any other part as its type in brackets.
const isParts = (v) => Array.isArray(v) && v.every((p) => p && typeof p === "object" && "type" in p && !("role" in p));

function asText(value) {
  if (typeof value === "string") return value;
  if (isParts(value)) return value.map((p) => (p.type === "text" ? String(p.text ?? "") : `[${p.type}]`)).join(" ");
  if (Array.isArray(value)) return value.map((m) => (m && typeof m === "object" ? asText(m.content) : String(m))).join("\n\n");
  return value == null ? "" : JSON.stringify(value);
}

// Characters that print nothing (zero-width spaces, Unicode tag characters, bidi overrides, soft hyphens): a policy
// optimised against a reward model can hide text there that the model reads and the reviewer would not see. Each
// run of them is shown as a marker naming how many and which; the ZWJ of emoji sequences is left alone.
const INVISIBLE = /(?:(?!\u200d)[\p{Cf}\u115f\u1160\u3164\uffa0])+/gu;

function hex(ch) {
  return "U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
}

// `text` into `node` as text nodes, invisible runs as marked spans (textContent only: never parsed as HTML).
// Returns how many invisible characters there were.
function setText(node, text) {
  node.replaceChildren();
  let last = 0, hidden = 0;
  for (const m of text.matchAll(INVISIBLE)) {
    node.append(text.slice(last, m.index));
    const chars = [...m[0]];
    hidden += chars.length;
    const names = [...new Set(chars.map(hex))];
    const mark = el("span", "invisible", `⟨${chars.length} invisible: ${names.slice(0, 3).join(" ")}` +
      `${names.length > 3 ? " …" : ""}⟩`);
    mark.title = "Characters that print nothing; the reward model reads them.";
    node.append(mark);
    last = m.index + m[0].length;
  }
  node.append(text.slice(last));
  return hidden;
}

function fmt(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(3);
  if (v == null) return "–";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

function renderPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  const content = (value) => {
    const node = el("div", "content");
    setText(node, asText(value));
    return node;
  };
  if (!Array.isArray(prompt)) {
    box.append(content(prompt));
    return;
  }
  for (const m of prompt) {
    const msg = el("div", "message");
    msg.append(el("span", "role", m && m.role ? m.role : "?"), content(m && m.content));
    box.append(msg);
  }
}

function renderResponse(article, side, resp) {
  article.dataset.side = side; // for tests and debugging only: nothing visible says which side is flagged
  const hidden = setText(article.querySelector(".text"),
    typeof resp.text === "string" ? resp.text : asText(resp.completion));
  const length = resp.length == null ? "? tokens" : `${resp.length} tokens`;
  const ending = resp.eos === true ? "ended (EOS)" : resp.eos === false ? "cut off (no EOS)" : "end unknown";
  const facts = article.querySelector(".facts");
  facts.textContent = `${length} · ${ending}` + (hidden ? ` · ${hidden} invisible characters` : "");
  facts.classList.toggle("cut", resp.eos === false);

  const rows = [["shaped score", resp.score], ["KL to reference", resp.kl]];
  for (const [k, v] of Object.entries(resp.rewards || {})) rows.push([`reward ${k}`, v]);
  for (const [k, v] of Object.entries(resp.audit || {})) rows.push([`audit ${k}`, v]);
  const body = article.querySelector(".scores tbody");
  body.replaceChildren(...rows.map(([k, v]) => {
    const tr = el("tr");
    tr.append(el("th", "", k), el("td", "", fmt(v)));
    return tr;
  }));
  article.querySelector("details").open = false;
}

function renderPair(pair) {
  current = pair;
  const [left, right] = sidesFor(pair.id);
  $("pair").dataset.id = pair.id;
  $("pair-id").textContent = pair.id;
  $("pair-iteration").textContent = pair.iteration == null ? "" : `iteration ${pair.iteration}`;
  $("pair-detectors").replaceChildren(...(pair.detectors || []).map((d) => el("span", "tag", d)));
  renderPrompt(pair.prompt);
  renderResponse($("left"), left, pair[left]);
  renderResponse($("right"), right, pair[right]);
  window.scrollTo(0, 0);
}

function render(state) {
  const c = state.counts;
  $("progress").textContent =
    `${c.decided} of ${c.total} reviewed · ${c.pending} pending · ${c.preferences} preference pairs`;
  lastDecision = state.last;
  $("btn-undo").disabled = !lastDecision;
  $("last").textContent = lastDecision
    ? `Last: ${lastDecision.id} — ${LAST_LABEL[lastDecision.decision] || lastDecision.decision}` : "";

  const next = state.pending[0];
  $("pair").hidden = !next;
  $("empty").hidden = !!next;
  document.body.dataset.view = next ? "pair" : "empty";
  if (!next) {
    current = null;
    renderEmpty(c, state.preferences_path);
  } else if (!current || current.id !== next.id) {
    renderPair(next); // a poll that finds the same pair leaves it alone (sides, open details, scroll)
  }
}

// No pair to show: nothing queued yet, or all reviewed. The retrain command only where there is a file to train on:
// preferences.jsonl exists once a pair is decided, and holds rows only for the pairs where a response was picked.
function renderEmpty(c, path) {
  $("empty-title").textContent = c.total ? "All reviewed" : "Nothing queued yet";
  $("empty-message").textContent = !c.total
    ? "The monitor has not queued a pair for review in this run yet."
    : c.preferences
      ? `Queue empty — ${c.preferences} preference pairs written to ${path}`
      : "Queue empty — no preference pairs yet: no pair was decided with a better response (both bad and skip " +
        "give none).";
  $("empty-path").textContent = path;
  $("empty-train").hidden = !c.preferences;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function refresh() {
  const gen = generation;
  const prefer = current ? `?prefer=${encodeURIComponent(current.id)}` : "";
  try {
    const state = await api(`/api/state${prefer}`);
    if (gen === generation && !busy) {
      render(state);
      showError(actionError);
    }
  } catch (e) {
    showError(e.message);
  }
}

function setBusy(on) {
  busy = on;
  document.body.classList.toggle("busy", on);
  for (const b of document.querySelectorAll("button")) b.disabled = on || (b.id === "btn-undo" && !lastDecision);
}

// The button that had the focus when an action started: disabling it while busy drops the focus to <body>, and a
// keyboard or screen-reader user would lose their place after every decision.
function focusBack(button) {
  if (!(button instanceof HTMLButtonElement)) return; // a keyboard shortcut: the focus was never on a button
  // the same button if it is still there; else (the last pair decided, nothing left to undo) the nearest equivalent
  const usable = (b) => !b.disabled && b.offsetParent !== null;
  const target = [button, $("btn-undo"), $("btn-left")].find(usable);
  if (target) target.focus();
}

async function act(action) {
  if (busy) return;
  let request;
  if (action === "undo") {
    if (!lastDecision) return;
    // by id: "the latest decision" may be another tab's by now, and this page offered to undo the one it shows
    request = ["/api/undo", { id: lastDecision.id }];
  } else {
    if (!current) return;
    const [left, right] = sidesFor(current.id);
    const decision = action === "left" ? left : action === "right" ? right : action;
    request = ["/api/decide", { id: current.id, decision }];
  }
  generation += 1;
  actionError = "";
  const focused = document.activeElement;
  setBusy(true);
  try {
    const state = await api(...request);
    if (action === "undo") current = null; // the undone pair comes back first; paint it even if it was on screen
    setBusy(false);
    render(state);
    showError("");
  } catch (e) {
    setBusy(false);
    actionError = e.message;
    showError(actionError);
    refresh(); // e.g. another tab decided this pair already: show what is pending now (the message stays)
  }
  focusBack(focused);
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return; // a held key must not decide several pairs
  if (e.target instanceof Element && e.target.closest("input, textarea, select, [contenteditable]")) return;
  const action = KEYS[e.key];
  if (!action) return;
  e.preventDefault();
  act(action);
});

document.addEventListener("click", (e) => {
  const button = e.target instanceof Element ? e.target.closest("button[data-action]") : null;
  if (button) act(button.dataset.action);
});

document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
setInterval(() => { if (!document.hidden && !busy) refresh(); }, POLL_MS);
refresh();
