// The reply state machine: the server's frames (docs/protocol.md) applied to
// the conversation on screen. The server is the source of truth: this module
// only mirrors what the frames say, and re-asks (subscribe) when it may have
// missed something.

import { giveBack, updateComposer } from "./composer.js";
import { announce, errorText, explainError, FRIENDLY, hideNotice, normaliseError, showNotice } from "./errors.js";
import {
  adoptUserBubble,
  appendReasoning,
  applyMessage,
  clearMessages,
  collapseReasoningForAnswer,
  createMessage,
  normaliseFeedback,
  removeMessage,
  renderNow,
  scheduleRender,
  showFeedback,
  showWaiting,
  updateEmptyState,
} from "./messages.js";
import { $, config, conversationUrl, els, LIVE, state } from "./page.js";
import { pending, requestId, socket } from "./requests.js";
import { showReviewNotice } from "./reviews.js";
import { setSettingsStatus } from "./settings.js";
import {
  findConversationItem,
  markActive,
  removeConversationItem,
  setSidebar,
  upsertConversation,
} from "./sidebar.js";
import { applyConversation, fillModels, setLlm, setTitle } from "./toolbar.js";
import { editRefused, pathMessage, showBranchOf, showPath, showVersions, switchRefused } from "./versions.js";

export function subscribe(id) {
  const subId = requestId("sub");
  const marker = `${subId}:end`;
  // Snapshots replace what we show; messages not replayed by the time the
  // marker's pong arrives are gone from the server (superseded) and go too.
  state.replay = { marker, conversation: id, stale: new Set(state.messages.keys()) };
  if (!socket.send({ type: "subscribe", id: subId, conversation: id })) {
    state.replay = null; // the open handler subscribes again
    return;
  }
  pending.set(subId, { type: "subscribe", conversation: id });
  socket.send({ type: "ping", id: marker });
}

/** Ask for a full replay after a gap in `seq`; repeated gaps during one replay are ignored. */
function resync() {
  if (state.current && !state.replay) subscribe(state.current);
}

function touchReplay(messageId) {
  if (state.replay) state.replay.stale.delete(messageId);
}

function finishReplay() {
  const replay = state.replay;
  state.replay = null;
  if (!replay || replay.conversation !== state.current) return;
  for (const id of replay.stale) removeMessage(id);
  for (const [id, entry] of pending) {
    if (entry.type === "send" && entry.lost && !entry.confirmed && entry.conversation === state.current) {
      giveBack(id, entry);
    }
  }
  updateComposer();
  updateEmptyState();
  scheduleRender();
}

/** A frame about one message counts only for the conversation on screen. */
const onScreen = (handler) => (frame) => {
  if (frame.conversation === state.current && frame.message) return handler(frame);
};

/** A `message` frame may be one of a new path's (versions.js), shown or not. */
const onPath = (handler) => (frame) => {
  handler(frame);
  if (typeof frame.message.id === "string") pathMessage(frame.message.id);
};

const HANDLERS = {
  ready(frame) {
    if (frame.protocol !== undefined && frame.protocol !== 1) {
      showNotice("The server was updated. Reload the page to keep chatting.");
    }
    state.models = Array.isArray(frame.models) ? frame.models.filter((m) => typeof m === "string") : [];
    if (frame.default_model) state.defaultModel = frame.default_model;
    setLlm(frame.llm === "unavailable" ? "unavailable" : "ok");
    fillModels();
  },

  pong(frame) {
    if (state.replay && frame.id === state.replay.marker) finishReplay();
  },

  conversation(frame) {
    const conv = frame.conversation;
    if (!conv || !conv.id) return;
    const entry = pending.get(frame.id);
    const known = Boolean(findConversationItem(conv.id));
    upsertConversation(conv);
    if (entry && entry.type === "send" && !entry.conversation) {
      adoptNewConversation(conv, entry);
    } else if (!entry && !known && !state.current) {
      // Fallback if a server does not echo `id` on this frame: a conversation
      // we have never seen, while a new-chat send is waiting, is ours.
      const waiting = [...pending.values()].find((e) => e.type === "send" && !e.conversation && e.sent);
      if (waiting) adoptNewConversation(conv, waiting);
    }
    if (conv.id === state.current) {
      applyConversation(conv);
      // The answer to an edit or a switch, ours or another tab's: the new active path.
      if (Array.isArray(frame.path)) showPath(frame.path.filter((id) => typeof id === "string"));
    }
    // A switch is answered; an edit waits on for its reply to start.
    if (entry && entry.type === "switch") pending.delete(frame.id);
    if (entry && entry.type === "subscribe") {
      // A subscribe on a socket already subscribed replays only the live
      // replies: what else is on screen is still current, not stale.
      if (frame.replay === "live" && state.replay?.conversation === conv.id) state.replay.stale.clear();
      pending.delete(frame.id);
    }
  },

  deleted(frame) {
    const id = frame.conversation;
    // A delete from this tab finishes in the sidebar, whichever of its answer and this frame comes first.
    if (typeof id !== "string" || state.deleting.has(id)) return;
    removeConversationItem(findConversationItem(id));
    if (id === state.current) {
      openConversation(null, { replace: true });
      showNotice("This conversation was deleted.");
    }
  },

  message: onScreen(onPath((frame) => {
    const snap = frame.message;
    if (snap.role === "system" || !snap.id) return;
    touchReplay(snap.id);
    if (snap.superseded) {
      // A regenerate replaced this reply; the new one follows as start/delta/end.
      removeMessage(snap.id);
      updateComposer();
      return;
    }
    let msg = state.messages.get(snap.id);
    if (!msg && snap.role === "user") msg = adoptUserBubble(snap, frame.id);
    if (!msg) msg = createMessage(snap.id, snap.role);
    setSiblings(msg, snap.siblings);
    const held = msg.seq;
    const snapSeq = Number.isInteger(snap.seq) ? snap.seq : 0;
    // An older snapshot of a reply we already follow further adds nothing.
    if (!(LIVE.has(msg.status) && LIVE.has(snap.status) && held > snapSeq)) {
      msg.content = snap.content || "";
      msg.reasoning = snap.reasoning || "";
      msg.seq = snapSeq;
      msg.status = snap.status || (snap.role === "user" ? "complete" : msg.status);
      msg.model = snap.model || msg.model;
      msg.usage = snap.usage || null;
      msg.timing = snap.timing || null;
      msg.error = normaliseError(snap.error, snap.status);
      msg.finishReason = snap.finish_reason || "";
      msg.feedback = normaliseFeedback(snap.feedback);
      applyMessage(msg, { reset: true });
    } else {
      showVersions(msg);
    }
    if (snap.role === "assistant" && LIVE.has(msg.status)) pending.replyStarted(state.current);
    updateComposer();
  })),

  start: onScreen((frame) => {
    touchReplay(frame.message);
    let msg = state.messages.get(frame.message);
    if (!msg) msg = createMessage(frame.message, "assistant");
    msg.status = "streaming";
    msg.model = frame.model || msg.model;
    setSiblings(msg, frame.siblings);
    applyMessage(msg);
    pending.replyStarted(state.current);
    updateComposer();
    announce("The assistant is replying.");
  }),

  delta: onScreen((frame) => {
    touchReplay(frame.message);
    const seq = frame.seq;
    let msg = state.messages.get(frame.message);
    if (!msg) {
      if (seq !== 1) return resync();
      msg = createMessage(frame.message, "assistant");
      msg.status = "streaming";
      pending.replyStarted(state.current);
      applyMessage(msg);
    }
    if (!Number.isInteger(seq) || seq <= msg.seq) return; // already contained in what we hold
    if (seq > msg.seq + 1) return resync();
    msg.seq = seq;
    showWaiting(msg);
    if (!LIVE.has(msg.status)) {
      msg.status = "streaming";
      msg.el.dataset.status = msg.status;
      updateComposer();
    }
    if (typeof frame.reasoning === "string" && frame.reasoning) appendReasoning(msg, frame.reasoning);
    if (typeof frame.content === "string" && frame.content) {
      const wasEmpty = msg.content.length === 0;
      msg.content += frame.content;
      if (wasEmpty) collapseReasoningForAnswer(msg);
      scheduleRender(msg);
    }
  }),

  end: onScreen((frame) => {
    touchReplay(frame.message);
    const msg = state.messages.get(frame.message);
    if (!msg) return resync();
    // The end says how many deltas there were; if we hold fewer, fetch the tail.
    if (Number.isInteger(frame.seq) && frame.seq > msg.seq) resync();
    msg.status = frame.status || "complete";
    if (frame.usage) msg.usage = frame.usage;
    if (frame.timing) msg.timing = frame.timing;
    msg.error = normaliseError(frame.error, msg.status);
    msg.finishReason = frame.finish_reason || "";
    applyMessage(msg);
    // The last deltas wait for the next animation frame; a reply marked
    // finished must not show less than it holds, even for a frame.
    renderNow();
    pending.replyStarted(state.current);
    updateComposer();
    if (msg.error && msg.error.code === "upstream_unavailable") setLlm("unavailable");
    else if (msg.status === "complete") setLlm("ok");
    announce(
      msg.status === "complete"
        ? msg.finishReason === "length"
          ? "Reply finished: cut off at the length limit."
          : "Reply finished."
        : msg.status === "stopped"
          ? "Reply stopped."
          : `Reply failed. ${explainError(msg)}`,
    );
  }),

  feedback(frame) {
    // The answer to our own rating, or another tab's: the reply's feedback as it now stands.
    pending.delete(frame.id);
    if (frame.conversation !== state.current || !frame.message) return;
    const msg = state.messages.get(frame.message);
    if (!msg) return;
    msg.feedback = normaliseFeedback(frame.feedback);
    showFeedback(msg);
  },

  error(frame) {
    const entry = pending.get(frame.id);
    if (entry) pending.delete(frame.id);
    if (frame.code === "upstream_unavailable") setLlm("unavailable");
    if (frame.conversation) {
      // A failed reply, reported to the socket that asked for it just after
      // its `end`: the reply itself already shows the error and a Retry button.
      updateComposer();
      return;
    }
    const text = errorText(frame);
    if (!entry) {
      showNotice(text);
      return;
    }
    if (frame.code === "busy" && busyElsewhere(frame, entry)) {
      if (entry.type === "send" && !entry.confirmed) giveBack(frame.id, entry, { notice: false });
      else if (entry.type === "edit") editRefused(entry);
      showNotice(FRIENDLY.busy_elsewhere, null, { text: "Show it", run: () => showBranchOf(frame.reply) });
      updateComposer();
      return;
    }
    if (entry.type === "send") {
      if (!entry.confirmed) giveBack(frame.id, entry, { notice: false });
      showNotice(text);
    } else if (entry.type === "subscribe" && frame.code === "not_found") {
      removeConversationItem(findConversationItem(entry.conversation));
      if (state.current === entry.conversation) {
        openConversation(null, { replace: true });
        showNotice(text);
      }
    } else if (entry.type === "feedback") {
      // The rating shown at once did not take: show it as it was.
      const msg = entry.conversation === state.current ? state.messages.get(entry.message) : null;
      if (msg) {
        msg.feedback = entry.previous;
        showFeedback(msg);
      }
      showNotice(text);
    } else if (entry.type === "edit" || entry.type === "switch") {
      if (entry.type === "edit") editRefused(entry);
      else switchRefused();
      // not_found here is most often about the message, which the friendly
      // words (about the conversation) would get wrong; the server's say which.
      showNotice(frame.code === "not_found" && frame.message ? frame.message : text);
    } else if (entry.type === "stop" && frame.code === "not_found") {
      // Nothing was running any more: not worth bothering the user.
    } else {
      showNotice(text);
    }
    updateComposer();
  },
};

/** A busy answer about a reply this page does not show: one on another branch of the conversation on screen. */
function busyElsewhere(frame, entry) {
  return (
    typeof frame.reply === "string" && entry.conversation === state.current && !state.messages.has(frame.reply)
  );
}

/** A frame's `siblings`, when it has them (a v1 server's do not): the versions of `msg`. */
function setSiblings(msg, siblings) {
  if (Array.isArray(siblings)) msg.siblings = siblings.filter((id) => typeof id === "string");
}

export function handleFrame(frame) {
  const handler = HANDLERS[frame.type];
  if (handler) handler(frame);
}

/** Take over the saved messages the server rendered into the page, as if the socket had sent them. */
export function showSavedMessages() {
  const data = document.getElementById("saved-messages");
  const saved = data ? JSON.parse(data.textContent) : [];
  for (const message of saved) HANDLERS.message({ type: "message", conversation: state.current, message });
  renderNow();
}

/** Our new-chat send created `conv`: show it as the current conversation unless the user moved on. */
function adoptNewConversation(conv, entry) {
  entry.conversation = conv.id;
  if (entry.stopRequested) pending.transmit({ type: "stop", conversation: conv.id });
  if (state.current) return; // the user moved on to another conversation meanwhile
  state.current = conv.id;
  state.currentModel = conv.model || els.model.value;
  history.pushState({ conversation: conv.id }, "", conversationUrl(conv.id));
  markActive();
  updateEmptyState();
}

/** Switch the page to conversation `id`, or to a new chat for null. */
export function openConversation(id, { push = true, replace = false } = {}) {
  id = id || null;
  if (id === state.current) {
    setSidebar(false);
    els.prompt.focus();
    return;
  }
  if (state.current && socket.isOpen) socket.send({ type: "unsubscribe", conversation: state.current });
  // Unconfirmed bubbles belong to the conversation we are leaving.
  for (const [reqId, entry] of pending) {
    if (entry.bubble && !entry.confirmed) entry.bubble = null;
    if (entry.type === "subscribe") pending.delete(reqId);
  }
  state.current = id;
  state.systemDirty = false;
  state.systemLoaded = !id;
  clearMessages();
  hideNotice();
  showReviewNotice(id);
  setSettingsStatus("");
  const li = findConversationItem(id);
  if (id) {
    state.currentModel = (li && li.dataset.model) || state.currentModel;
    setTitle(li ? $(".conversation-title", li).textContent : "");
    els.system.value = "";
    subscribe(id);
  } else {
    setTitle("");
    els.system.value = "";
    state.newChatModel = "";
  }
  fillModels();
  const url = id ? conversationUrl(id) : config.chatUrl;
  if (replace) history.replaceState({ conversation: id }, "", url);
  else if (push) history.pushState({ conversation: id }, "", url);
  markActive();
  updateComposer();
  setSidebar(false);
  els.prompt.focus();
}
