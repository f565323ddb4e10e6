// Search in the sidebar: the user's own conversations, titles and message
// text, asked of the server (its URL in config.searchUrl) as the user types.
// The hits take the list's place while there is a query; choosing one opens
// its conversation and brings the message into view, highlighted.

import { $, config, els, state } from "./page.js";

const DEBOUNCE_MS = 250;
const REVEAL_TIMEOUT_MS = 10_000;
// A hit's link says which message it is about, so that it also works opened
// in a new tab: the page reveals the message named in its address.
const HASH_PREFIX = "#message-";

const search = {
  form: $("#search"),
  input: $("#search-input"),
  results: $("#search-results"),
  status: $("#search-status"),
  list: $("#search-list"),
};

let timer = null;
let asked = 0; // answers to older queries are dropped

function showResults(shown) {
  search.results.hidden = !shown;
  els.list.hidden = shown;
  // The "No conversations yet." line belongs to the list.
  if (shown) els.noConversations.hidden = true;
  else els.noConversations.hidden = els.list.querySelector("li[data-id]") !== null;
}

function clearSearch() {
  clearTimeout(timer);
  asked += 1;
  search.input.value = "";
  search.list.replaceChildren();
  search.status.textContent = "";
  showResults(false);
}

/** A snippet's runs, {text, mark}, as text nodes and <mark>: nothing in a message is parsed as HTML. */
function snippetNodes(runs) {
  const nodes = [];
  for (const run of Array.isArray(runs) ? runs : []) {
    if (typeof run?.text !== "string") continue;
    if (run.mark) {
      const mark = document.createElement("mark");
      mark.textContent = run.text;
      nodes.push(mark);
    } else {
      nodes.push(document.createTextNode(run.text));
    }
  }
  return nodes;
}

function hitItem(hit) {
  const li = document.createElement("li");
  const link = document.createElement("a");
  link.className = "search-hit";
  link.href = hit.message ? `${hit.url}${HASH_PREFIX}${hit.message}` : hit.url;
  link.dataset.conversation = hit.conversation;
  if (hit.message) link.dataset.message = hit.message;
  const title = document.createElement("span");
  title.className = "search-hit-title";
  title.textContent = hit.title || "New chat";
  const snippet = document.createElement("span");
  snippet.className = "search-hit-snippet";
  if (hit.message) {
    const who = document.createElement("span");
    who.className = "search-hit-role";
    who.textContent = hit.role === "user" ? "You: " : "Assistant: ";
    snippet.append(who);
  }
  snippet.append(...snippetNodes(hit.snippet));
  link.append(title, snippet);
  li.append(link);
  return li;
}

async function runSearch(query) {
  const mine = ++asked;
  search.status.textContent = "Searching…";
  let data = null;
  try {
    const response = await fetch(`${config.searchUrl}?${new URLSearchParams({ q: query })}`, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    data = await response.json().catch(() => null);
    if (!response.ok) throw new Error((data && data.message) || `HTTP ${response.status}`);
  } catch (error) {
    if (mine === asked) search.status.textContent = `Search failed: ${error.message}`;
    return;
  }
  if (mine !== asked) return;
  const hits = Array.isArray(data.results) ? data.results : [];
  search.list.replaceChildren(...hits.map(hitItem));
  const more = hits.length >= data.limit ? " (the best ones; type more to narrow it down)" : "";
  search.status.textContent = hits.length
    ? `${hits.length} result${hits.length === 1 ? "" : "s"}${more}`
    : "Nothing found.";
}

function onInput() {
  clearTimeout(timer);
  const query = search.input.value.trim();
  if (!query) {
    clearSearch();
    return;
  }
  showResults(true);
  timer = setTimeout(() => runSearch(query), DEBOUNCE_MS);
}

/**
 * Bring message `id` of the conversation on screen into view and highlight
 * it, once it is shown: right away when it is on screen already, else when
 * the conversation's snapshot (subscribe) has brought it.
 */
export function revealMessage(id) {
  const started = Date.now();
  const conversation = state.current;
  const attempt = () => {
    if (state.current !== conversation) return; // the user moved on
    const msg = state.messages.get(id);
    if (!msg || state.replay) {
      if (Date.now() - started < REVEAL_TIMEOUT_MS) setTimeout(attempt, 50);
      return;
    }
    // Markdown renders on the next animation frame: measure after it.
    requestAnimationFrame(() =>
      requestAnimationFrame(() => {
        for (const old of els.messages.querySelectorAll("article.search-target")) old.classList.remove("search-target");
        // Stop following the bottom, or the next render would scroll away.
        state.stick = false;
        msg.el.classList.add("search-target");
        msg.el.tabIndex = -1;
        msg.el.scrollIntoView({ block: "center" });
        msg.el.focus({ preventScroll: true });
      }),
    );
  };
  attempt();
}

/** The message the page's address names (a search hit opened in a new tab), if any. */
export function revealFromAddress() {
  if (location.hash.startsWith(HASH_PREFIX)) revealMessage(location.hash.slice(HASH_PREFIX.length));
}

/** `open(id)` switches the page to a conversation, as the sidebar does. */
export function installSearch({ open }) {
  search.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = search.input.value.trim();
    if (query) {
      clearTimeout(timer);
      showResults(true);
      runSearch(query);
    }
  });
  search.input.addEventListener("input", onInput);
  search.input.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown") {
      const first = search.list.querySelector("a.search-hit");
      if (first) {
        event.preventDefault();
        first.focus();
      }
      return;
    }
    if (event.key !== "Escape") return;
    // Escape here clears the search; it must not also stop a reply.
    event.preventDefault();
    event.stopPropagation();
    clearSearch();
  });
  // Up and down move between the hits, and from the first back to the box.
  search.list.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    const hits = [...search.list.querySelectorAll("a.search-hit")];
    const at = hits.indexOf(document.activeElement);
    if (at < 0) return;
    event.preventDefault();
    const next = event.key === "ArrowDown" ? hits[at + 1] : hits[at - 1] || search.input;
    if (next) next.focus();
  });
  search.list.addEventListener("click", (event) => {
    const link = event.target.closest("a.search-hit");
    if (!link) return;
    // Let the browser handle new-tab and new-window clicks.
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    open(link.dataset.conversation);
    if (link.dataset.message) revealMessage(link.dataset.message);
  });
}
