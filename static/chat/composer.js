// The composer: sending a message, stopping and regenerating a reply, and
// which of Send and Stop it offers while a reply is being written.

import { FRIENDLY, hideNotice, showNotice } from "./errors.js";
import { scheduleRender, updateEmptyState } from "./messages.js";
import { $, config, els, FAILED, LIVE, replyActions, state } from "./page.js";
import { pending } from "./requests.js";
import { setSidebar } from "./sidebar.js";
import { setEditable } from "./versions.js";

function isBusy() {
  for (const msg of state.messages.values()) {
    if (msg.role === "assistant" && LIVE.has(msg.status)) return true;
  }
  return pending.waitingForStart(state.current);
}

export function updateComposer() {
  const busy = isBusy();
  els.prompt.disabled = busy;
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.messages.toggleAttribute("data-busy", busy);
  placeReplyActions(busy);
  setEditable(!busy);
  if (state.wasBusy && !busy) {
    const active = document.activeElement;
    if (!active || active === document.body || active === els.stop) els.prompt.focus();
  }
  state.wasBusy = busy;
}

function placeReplyActions(busy) {
  const last = els.messages.lastElementChild;
  const msg = last && last.classList.contains("assistant") ? state.messages.get(last.dataset.id) : null;
  const done = msg && !busy && !LIVE.has(msg.status);
  const failed = done && FAILED.has(msg.status);
  // Move a button only when its place changes, so a focused one keeps focus.
  const place = (button, parent) => {
    if (!parent) button.remove();
    else if (button.parentElement !== parent) parent.append(button);
  };
  place(replyActions.regenerate, done && !failed ? $(".message-actions", last) : null);
  place(replyActions.retry, failed ? $(".message-error", last) : null);
}

function sendMessage() {
  const content = els.prompt.value;
  if (!content.trim() || isBusy()) return;
  if (content.length > config.maxContent) {
    showNotice(FRIENDLY.too_large);
    return;
  }
  hideNotice();
  const bubble = els.tplUser.content.firstElementChild.cloneNode(true);
  bubble.classList.add("pending");
  $(".content", bubble).textContent = content;
  els.messages.append(bubble);
  const id = pending.add("send", {
    type: "send",
    conversation: state.current,
    content,
    bubble,
    awaitingStart: true,
    confirmed: false,
    sent: false,
  });
  const frame = { type: "send", id, conversation: state.current, content };
  const model = els.model.value;
  if (model) frame.model = model;
  // For an existing conversation the system prompt is saved through the
  // settings endpoint; a new one takes it with its first message.
  if (!state.current) frame.system = els.system.value;
  els.prompt.value = "";
  autoGrow();
  state.stick = true;
  updateEmptyState();
  pending.transmit(frame);
  updateComposer();
  scheduleRender(null);
}

/** Undo an unconfirmed send: drop its bubble and put the text back to be sent again. */
export function giveBack(id, entry, { notice = true } = {}) {
  pending.delete(id);
  entry.bubble?.remove();
  if (!els.prompt.value.trim()) {
    els.prompt.value = entry.content;
    autoGrow();
  }
  if (notice) showNotice("The connection dropped before your message was confirmed. It is back in the input box.");
  updateEmptyState();
  updateComposer();
}

function stopReply() {
  // A message still waiting in the offline queue can simply be taken back.
  const queued = pending.unqueueSend(state.current);
  if (queued) {
    if (queued.entry) giveBack(queued.id, queued.entry, { notice: false });
    return;
  }
  if (!state.current) {
    // The conversation does not exist yet; stop it as soon as we learn its id.
    for (const entry of pending.values()) {
      if (entry.type === "send" && !entry.conversation) entry.stopRequested = true;
    }
    return;
  }
  const id = pending.add("stop", { type: "stop", conversation: state.current });
  pending.transmit({ type: "stop", id, conversation: state.current });
}

export function regenerate() {
  if (!state.current || isBusy()) return;
  hideNotice();
  const id = pending.add("regen", { type: "regenerate", conversation: state.current, awaitingStart: true });
  pending.transmit({ type: "regenerate", id, conversation: state.current });
  state.stick = true;
  updateComposer();
}

const growsNatively = window.CSS && CSS.supports && CSS.supports("field-sizing", "content");

export function autoGrow() {
  if (growsNatively) return;
  const p = els.prompt;
  p.style.height = "auto";
  p.style.height = `${Math.min(p.scrollHeight + 2, Math.round(window.innerHeight * 0.4))}px`;
}

export function installComposer() {
  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });

  els.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.altKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    }
  });

  els.prompt.addEventListener("input", autoGrow);
  els.stop.addEventListener("click", stopReply);

  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (document.body.classList.contains("sidebar-open")) {
      setSidebar(false);
      return;
    }
    if (isBusy()) {
      event.preventDefault();
      stopReply();
    }
  });
}
