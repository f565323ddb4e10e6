// The sidebar: the user's conversations, newest first and grouped by when
// they were last used, with rename and delete, and (at phone width) its
// opening and closing over the conversation.

import { postForm, relativeTime } from "./common.js";
import { FRIENDLY, showNotice } from "./errors.js";
import { $, config, conversationUrl, els, idFromPath, state } from "./page.js";
import { setTitle } from "./toolbar.js";

export function findConversationItem(id) {
  return id ? els.list.querySelector(`li[data-id="${CSS.escape(id)}"]`) : null;
}

const items = () => els.list.querySelectorAll("li[data-id]");

export function updateSidebarEmpty() {
  els.noConversations.hidden = items().length > 0;
}

/** Take a conversation off the sidebar, and its group with it once empty. */
export function removeConversationItem(li) {
  if (!li) return;
  const group = li.closest(".conversation-group");
  li.remove();
  if (group && !group.querySelector("li[data-id]")) group.remove();
  updateSidebarEmpty();
}

export function markActive() {
  for (const li of items()) {
    const link = $(".conversation-link", li);
    if (li.dataset.id === state.current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

/** Add a conversation the server told us about, or bring its item up to date. */
export function upsertConversation(conv) {
  let li = findConversationItem(conv.id);
  if (!li) {
    li = els.tplConversation.content.firstElementChild.cloneNode(true);
    li.dataset.id = conv.id;
    $(".conversation-link", li).href = conversationUrl(conv.id);
    for (const link of li.querySelectorAll("a[data-url-kind]")) link.href = conversationUrl(conv.id, link.dataset.urlKind);
  }
  showItemTitle(li, conv.title);
  if (conv.model) li.dataset.model = conv.model;
  if (conv.updated) {
    li.dataset.updated = conv.updated;
    const time = $("time", li);
    time.setAttribute("datetime", conv.updated);
    time.textContent = relativeTime(conv.updated);
  }
  placeByUpdated(li);
  markActive();
  updateSidebarEmpty();
}

/** The title in the item, and in full as its tooltip, since a long one ends in an ellipsis. */
function showItemTitle(li, title) {
  const shown = title || "New chat";
  $(".conversation-title", li).textContent = shown;
  $(".conversation-link", li).title = shown;
}

// The groups other chat sites use, newest first; `since` is how many local
// days before today's midnight a group begins.
const GROUPS = [
  { key: "today", label: "Today", since: 0 },
  { key: "yesterday", label: "Yesterday", since: 1 },
  { key: "week", label: "Previous 7 days", since: 7 },
  { key: "older", label: "Older", since: Infinity },
];

const when = (el) => Date.parse(el.dataset.updated || "") || 0;

function groupOf(time, now = new Date()) {
  for (const group of GROUPS) {
    // Built from the calendar date, so a day is a local day also across a DST change.
    const start = new Date(now.getFullYear(), now.getMonth(), now.getDate() - group.since);
    if (group.since === Infinity || time >= start.getTime()) return group;
  }
  return GROUPS[GROUPS.length - 1];
}

function groupList(group) {
  let section = els.list.querySelector(`.conversation-group[data-group="${group.key}"]`);
  if (!section) {
    section = document.createElement("div");
    section.className = "conversation-group";
    section.setAttribute("role", "group");
    section.dataset.group = group.key;
    section.setAttribute("aria-labelledby", `group-${group.key}`);
    const heading = document.createElement("h2");
    heading.className = "conversation-group-title";
    heading.id = `group-${group.key}`;
    heading.textContent = group.label;
    section.append(heading, document.createElement("ul"));
    const order = GROUPS.indexOf(group);
    const after = [...els.list.children].find((el) => GROUPS.findIndex((g) => g.key === el.dataset.group) > order);
    els.list.insertBefore(section, after || null);
  }
  return $("ul", section);
}

/** Newest first within its group; only move the item when its place is wrong, so focus inside it survives. */
function placeByUpdated(li, now = new Date()) {
  const mine = when(li);
  const list = groupList(groupOf(mine, now));
  const prev = li.previousElementSibling;
  const next = li.nextElementSibling;
  if (li.parentElement === list && (!prev || when(prev) >= mine) && (!next || when(next) <= mine)) return;
  const old = li.closest(".conversation-group");
  const before = [...list.children].find((el) => el !== li && when(el) < mine);
  list.insertBefore(li, before || null);
  if (old && !old.querySelector("li[data-id]")) old.remove();
}

/** Sort every item into its group: at start, and again as days pass. */
export function regroupConversations() {
  const now = new Date();
  for (const li of items()) placeByUpdated(li, now);
  // The server's own, ungrouped list is left empty.
  for (const list of els.list.querySelectorAll(":scope > ul")) if (!list.childElementCount) list.remove();
}

function startRename(li) {
  if (li.classList.contains("renaming")) return;
  const link = $(".conversation-link", li);
  const old = $(".conversation-title", li).textContent;
  const input = document.createElement("input");
  input.type = "text";
  input.className = "rename-input";
  input.value = old;
  input.maxLength = config.maxTitle;
  input.setAttribute("aria-label", "Conversation title");
  li.classList.add("renaming");
  link.hidden = true;
  link.after(input);
  input.focus();
  input.select();

  let finished = false;
  const finish = async (save) => {
    if (finished) return;
    finished = true;
    const title = input.value.trim();
    input.remove();
    link.hidden = false;
    li.classList.remove("renaming");
    $(".rename", li)?.focus();
    if (!save || !title || title === old) return;
    const show = (shown) => {
      showItemTitle(li, shown);
      if (li.dataset.id === state.current) setTitle(shown);
    };
    show(title);
    try {
      const data = await postForm(conversationUrl(li.dataset.id, "rename"), { title });
      show((data && data.title) || title);
    } catch (error) {
      show(old);
      showNotice(error.code === "not_found" ? FRIENDLY.not_found : "Could not rename the conversation.");
    }
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      // Escape here cancels the rename, it must not also stop a reply.
      event.preventDefault();
      event.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(li, open) {
  const title = $(".conversation-title", li).textContent;
  if (!window.confirm(`Delete “${title}”? This cannot be undone.`)) return;
  const id = li.dataset.id;
  state.deleting.add(id);
  // Deleted already (in another tab or window): the item goes all the same,
  // and the user is told why it was not this click that did it.
  let gone = false;
  try {
    await postForm(conversationUrl(id, "delete"));
  } catch (error) {
    gone = error.code === "not_found" || error.status === 404;
    if (!gone) {
      showNotice("Could not delete the conversation.");
      return;
    }
  } finally {
    state.deleting.delete(id);
  }
  const all = [...items()];
  const at = all.indexOf(li);
  const next = all[at + 1] || all[at - 1];
  removeConversationItem(li);
  if (state.current === id) open(null, { replace: true });
  else ($(".delete", next || document.body) || els.newChat).focus();
  if (gone) showNotice(FRIENDLY.not_found);
}

export function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  els.sidebarToggle.setAttribute("aria-expanded", String(open));
}

/** `open(id, options)` switches the page to a conversation (null: a new chat). */
export function installSidebar({ open }) {
  regroupConversations();
  // "Today" becomes "Yesterday" at midnight, also in a tab left open.
  setInterval(regroupConversations, 60_000);
  window.addEventListener("popstate", () => open(idFromPath(location.pathname), { push: false }));

  els.newChat.addEventListener("click", () => open(null));

  els.list.addEventListener("click", (event) => {
    const li = event.target.closest("li[data-id]");
    if (!li) return;
    if (event.target.closest(".rename")) {
      startRename(li);
    } else if (event.target.closest(".delete")) {
      deleteConversation(li, open);
    } else if (event.target.closest(".conversation-link")) {
      // Let the browser handle new-tab and new-window clicks.
      if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
      event.preventDefault();
      open(li.dataset.id);
    }
  });

  els.sidebarToggle.addEventListener("click", () => {
    setSidebar(!document.body.classList.contains("sidebar-open"));
  });
  els.sidebarBackdrop.addEventListener("click", () => setSidebar(false));
}
