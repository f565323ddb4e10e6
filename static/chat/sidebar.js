// The sidebar: the user's conversations, newest first, with rename and
// delete, and (at phone width) its opening and closing over the conversation.

import { postForm, relativeTime } from "./common.js";
import { FRIENDLY, showNotice } from "./errors.js";
import { $, config, conversationUrl, els, idFromPath, state } from "./page.js";
import { setTitle } from "./toolbar.js";

export function findConversationItem(id) {
  return id ? els.list.querySelector(`li[data-id="${CSS.escape(id)}"]`) : null;
}

export function updateSidebarEmpty() {
  els.noConversations.hidden = els.list.childElementCount > 0;
}

export function markActive() {
  for (const li of els.list.children) {
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
  }
  $(".conversation-title", li).textContent = conv.title || "New chat";
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

/** Keep newest first; only move the item when its place is wrong, so focus inside it survives. */
function placeByUpdated(li) {
  const when = (el) => Date.parse(el.dataset.updated || "") || 0;
  const mine = when(li);
  const prev = li.previousElementSibling;
  const next = li.nextElementSibling;
  if (li.parentElement === els.list && (!prev || when(prev) >= mine) && (!next || when(next) <= mine)) return;
  const before = [...els.list.children].find((el) => el !== li && when(el) < mine);
  els.list.insertBefore(li, before || null);
}

function startRename(li) {
  if (li.classList.contains("renaming")) return;
  const link = $(".conversation-link", li);
  const titleEl = $(".conversation-title", li);
  const old = titleEl.textContent;
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
    titleEl.textContent = title;
    if (li.dataset.id === state.current) setTitle(title);
    try {
      const data = await postForm(conversationUrl(li.dataset.id, "rename"), { title });
      const saved = (data && data.title) || title;
      titleEl.textContent = saved;
      if (li.dataset.id === state.current) setTitle(saved);
    } catch (error) {
      titleEl.textContent = old;
      if (li.dataset.id === state.current) setTitle(old);
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
  try {
    await postForm(conversationUrl(id, "delete"));
  } catch (error) {
    if (error.code !== "not_found") {
      showNotice("Could not delete the conversation.");
      return;
    }
  }
  const next = li.nextElementSibling || li.previousElementSibling;
  li.remove();
  updateSidebarEmpty();
  if (state.current === id) open(null, { replace: true });
  else ($(".delete", next || document.body) || els.newChat).focus();
}

export function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  els.sidebarToggle.setAttribute("aria-expanded", String(open));
}

/** `open(id, options)` switches the page to a conversation (null: a new chat). */
export function installSidebar({ open }) {
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
