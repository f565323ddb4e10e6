// Versions of a message (issue 13): the Edit button and inline editor on the
// user's own messages, and "‹ n/m ›" on any message with more than one
// version. Editing and switching only ask the server; its answer, the new
// active path, comes back to every tab as a `conversation` frame with `path`
// followed by the path's `message` frames (stream.js), and is shown from here.

import { updateComposer } from "./composer.js";
import { FRIENDLY, hideNotice, showNotice } from "./errors.js";
import { removeMessage, renderNow } from "./messages.js";
import { $, config, els, state } from "./page.js";
import { pending } from "./requests.js";
import { placeAt } from "./scroll.js";

// False while a reply is being written in the conversation: the server
// would answer an edit with busy (composer.js says when).
let editable = true;
// The path of an edit or a switch, while its messages arrive: ids not yet seen.
let awaitingPath = null;
// Our own switch, until its path is shown: which version it asked for, and
// where the message switched from stood on screen, to put the new one there.
let switching = null;

/** Show a message's versions and, on the user's own, its Edit button. */
export function showVersions(msg) {
  const group = $(".versions", msg.el);
  const ids = msg.siblings;
  const at = ids.indexOf(msg.id);
  const many = ids.length > 1 && at >= 0;
  group.hidden = !many;
  if (!many) {
    group.replaceChildren();
    group.removeAttribute("aria-label");
  } else {
    // Built only when needed, so a message without versions holds nothing but its own text.
    if (!group.firstElementChild) group.append(els.tplVersions.content.cloneNode(true));
    $(".version-prev", group).disabled = at === 0;
    $(".version-next", group).disabled = at === ids.length - 1;
    $(".version-count", group).textContent = `${at + 1}/${ids.length}`;
    group.setAttribute("aria-label", `Version ${at + 1} of ${ids.length}`);
  }
  const edit = $(".edit", msg.el);
  if (edit) {
    edit.hidden = false;
    edit.disabled = !editable;
  }
}

/** Offer Edit (and Save in an open editor) only while no reply is being written. */
export function setEditable(flag) {
  if (flag === editable) return;
  editable = flag;
  for (const button of els.messages.querySelectorAll(".message.user .edit, .message-editor .editor-save")) {
    button.disabled = !flag;
  }
}

function openEditor(msg, text = msg.content) {
  let form = $(".message-editor", msg.el);
  if (!form) {
    form = els.tplEditor.content.firstElementChild.cloneNode(true);
    $(".editor-save", form).disabled = !editable;
    msg.el.classList.add("editing");
    $(".content", msg.el).hidden = true;
    $(".message-tools", msg.el).hidden = true;
    $(".content", msg.el).after(form);
  }
  const area = $("textarea", form);
  area.value = text;
  area.focus();
  area.setSelectionRange(area.value.length, area.value.length);
}

function closeEditor(msg, { refocus = true } = {}) {
  const form = $(".message-editor", msg.el);
  if (!form) return;
  form.remove();
  msg.el.classList.remove("editing");
  $(".content", msg.el).hidden = false;
  $(".message-tools", msg.el).hidden = false;
  if (refocus) $(".edit", msg.el).focus();
}

/** Send the editor's text as a new version of `msg`; its reply streams in as a send's does. */
function saveEdit(msg, form) {
  const content = $("textarea", form).value;
  if (!content.trim() || !state.current) return;
  if (!editable) {
    showNotice(FRIENDLY.busy);
    return;
  }
  if (content.length > config.maxContent) {
    showNotice(FRIENDLY.too_large);
    return;
  }
  hideNotice();
  const conversation = state.current;
  const entry = { type: "edit", conversation, message: msg.id, content, awaitingStart: true };
  const id = pending.add("edit", entry);
  const frame = { type: "edit", id, conversation, message: msg.id, content };
  const model = els.model.value;
  if (model) frame.model = model;
  closeEditor(msg, { refocus: false });
  // The new version and its reply end the conversation: follow them there.
  state.stick = true;
  pending.transmit(frame);
  updateComposer();
}

/** The server refused an edit: give its text back in the editor, if the message is still shown. */
export function editRefused(entry) {
  const msg = entry.conversation === state.current ? state.messages.get(entry.message) : null;
  if (msg) openEditor(msg, entry.content);
}

function switchVersion(msg, step) {
  const at = msg.siblings.indexOf(msg.id);
  const target = at >= 0 ? msg.siblings[at + step] : undefined;
  if (!target || !state.current) return;
  switching = {
    conversation: state.current,
    target,
    step,
    top: msg.el.getBoundingClientRect().top - els.scroller.getBoundingClientRect().top,
    refocus: msg.el.contains(document.activeElement),
  };
  // Where the reader was is kept (finishPath), not the bottom.
  state.stick = false;
  hideNotice();
  const id = pending.add("switch", { type: "switch", conversation: state.current, message: target });
  pending.transmit({ type: "switch", id, conversation: state.current, message: target });
}

/** Show the branch of a message that is not on screen (a reply in progress elsewhere), at its end. */
export function showBranchOf(message) {
  if (!state.current) return;
  forgetPath();
  state.stick = true;
  const id = pending.add("switch", { type: "switch", conversation: state.current, message });
  pending.transmit({ type: "switch", id, conversation: state.current, message });
}

/**
 * A new active path for the conversation on screen (after an edit or a switch,
 * ours or another tab's): drop what is not on it. The kept messages are the
 * path's common start, so the path's messages that follow as `message`
 * frames append in order.
 */
export function showPath(path) {
  const on = new Set(path);
  for (const id of [...state.messages.keys()]) {
    if (!on.has(id)) removeMessage(id);
  }
  awaitingPath = on;
  if (!on.size) finishPath();
}

/** A `message` frame was shown; the last one of a new path finishes it. */
export function pathMessage(id) {
  if (!awaitingPath || !awaitingPath.delete(id) || awaitingPath.size) return;
  finishPath();
}

/** Nothing of a path is awaited any more: another conversation is on screen. */
export function forgetPath() {
  awaitingPath = null;
  switching = null;
}

/** The switch that asked for a path was refused. */
export function switchRefused() {
  switching = null;
}

function finishPath() {
  awaitingPath = null;
  const asked = switching;
  switching = null;
  const msg = asked && asked.conversation === state.current ? state.messages.get(asked.target) : null;
  if (!msg) return;
  // The version takes the place of the one it replaced, heights rendered.
  renderNow();
  placeAt(msg.el, asked.top);
  if (asked.refocus) {
    // The button pressed went with its message: press on from the same one in
    // the new version, or the other when this end has none.
    const same = $(asked.step < 0 ? ".version-prev" : ".version-next", msg.el);
    const other = $(asked.step < 0 ? ".version-next" : ".version-prev", msg.el);
    const button = same && !same.disabled ? same : other;
    if (button) button.focus({ preventScroll: true });
  }
}

export function installVersions() {
  els.messages.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    const article = button && button.closest(".message");
    const msg = article ? state.messages.get(article.dataset.id) : null;
    if (!msg) return;
    if (button.classList.contains("edit")) {
      if (editable) openEditor(msg);
    } else if (button.classList.contains("editor-cancel")) {
      closeEditor(msg);
    } else if (button.classList.contains("version-prev")) {
      switchVersion(msg, -1);
    } else if (button.classList.contains("version-next")) {
      switchVersion(msg, 1);
    }
  });

  els.messages.addEventListener("submit", (event) => {
    const form = event.target.closest(".message-editor");
    if (!form) return;
    event.preventDefault();
    const msg = state.messages.get(form.closest(".message")?.dataset.id);
    if (msg) saveEdit(msg, form);
  });

  els.messages.addEventListener("keydown", (event) => {
    const form = event.target.closest(".message-editor");
    if (!form || event.target.tagName !== "TEXTAREA" || event.isComposing) return;
    const msg = state.messages.get(form.closest(".message")?.dataset.id);
    if (!msg) return;
    if (event.key === "Enter" && !event.shiftKey && !event.altKey) {
      event.preventDefault();
      saveEdit(msg, form);
    } else if (event.key === "Escape") {
      // Taken here: the page's own Escape would stop a reply being written.
      event.preventDefault();
      closeEditor(msg);
    }
  });
}
