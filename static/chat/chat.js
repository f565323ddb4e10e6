// The chat page: sidebar, conversation view and composer, driven by the
// WebSocket protocol v1 (docs/protocol.md). The server is the source of truth:
// this module only mirrors what the frames say, and re-asks (subscribe) when
// it may have missed something.

import { ChatSocket } from "./socket.js";
import { MarkdownView } from "./markdown.js";
import { copyText, flashButton, postForm, relativeTime, refreshRelativeTimes } from "./common.js";

const $ = (selector, root = document) => root.querySelector(selector);

const root = $("#chat");
const els = {
  sidebarToggle: $("#sidebar-toggle"),
  sidebarBackdrop: $("#sidebar-backdrop"),
  newChat: $("#new-chat"),
  list: $("#conversation-list"),
  noConversations: $("#no-conversations"),
  title: $("#chat-title"),
  model: $("#model"),
  settings: $("#settings"),
  system: $("#system"),
  saveSettings: $("#save-settings"),
  settingsStatus: $("#settings-status"),
  connection: $("#connection-status"),
  llm: $("#llm-status"),
  scroller: $("#messages-scroll"),
  messages: $("#messages"),
  empty: $("#empty-state"),
  jump: $("#jump-latest"),
  notice: $("#notice"),
  noticeText: $("#notice-text"),
  noticeLink: $("#notice-link"),
  noticeDismiss: $("#notice-dismiss"),
  composer: $("#composer"),
  prompt: $("#prompt"),
  send: $("#send"),
  stop: $("#stop"),
  announcer: $("#sr-status"),
  tplConversation: $("#tpl-conversation"),
  tplUser: $("#tpl-user-message"),
  tplAssistant: $("#tpl-assistant-message"),
};

// One Regenerate and one Retry button for the whole page, moved to the last
// reply: they only ever act on the last one, and a single element is
// unambiguous for keyboard users, screen readers and tests.
const replyActions = {
  regenerate: $("#tpl-reply-actions").content.querySelector(".regenerate").cloneNode(true),
  retry: $("#tpl-reply-actions").content.querySelector(".retry").cloneNode(true),
};

const SITE_NAME = root.dataset.siteName || "chatsite";
const MAX_CONTENT = 32_000;
const LIVE = new Set(["pending", "streaming"]);
const FAILED = new Set(["error", "interrupted"]);

// Words a user understands, per error code of the protocol.
const FRIENDLY = {
  upstream_unavailable: "The model server is not reachable. Is it running?",
  model_not_found: "This model is not installed on the model server.",
  timeout: "The model server took too long to answer.",
  upstream_error: "The model server reported an error while answering.",
  busy: "A reply is already being written in this conversation. Wait for it or press Stop.",
  rate_limited: "You are sending messages too quickly. Wait a moment and try again.",
  too_large: `That message is too long (the limit is ${MAX_CONTENT.toLocaleString("en")} characters).`,
  bad_request: "The server did not understand that request.",
  not_found: "This conversation does not exist or was deleted.",
  server_error: "Something went wrong on the server. Try again.",
  interrupted: "The reply was cut off before it finished (the server restarted or lost the model server).",
};

const friendly = (code, fallback = "Something went wrong.") => FRIENDLY[code] || fallback;

// ---------------------------------------------------------------- state

const state = {
  current: root.dataset.conversation || null,
  currentModel: root.dataset.conversationModel || "",
  defaultModel: root.dataset.defaultModel || "",
  newChatModel: "",
  models: [],
  llm: "unknown",
  messages: new Map(), // message id -> Msg
  pending: new Map(), // request id -> what we asked for, until answered
  outbox: [], // frames written while offline
  replay: null, // {marker, stale:Set} while a subscribe's snapshots arrive
  systemDirty: false,
  systemLoaded: true, // the template filled #system for the conversation it rendered
  stick: true, // follow the bottom of the conversation
  wasBusy: false,
  probedLogin: false,
};

let requestCounter = 0;
// crypto.randomUUID needs a secure context; a LAN install is often plain http.
const requestId = (kind) =>
  `${kind}-${Date.now().toString(36)}-${(requestCounter += 1)}-${Math.random().toString(36).slice(2, 8)}`;

const conversationUrl = (id) => `/c/${id}/`;
const idFromPath = (path) => {
  const match = /\/c\/([0-9a-fA-F-]{32,36})\/?$/.exec(path);
  return match ? match[1] : null;
};

// ---------------------------------------------------------------- socket

const socket = new ChatSocket(root.dataset.wsPath || "/ws/chat/");

function transmit(frame) {
  const entry = frame.id ? state.pending.get(frame.id) : null;
  if (socket.send(frame)) {
    if (entry) {
      entry.sent = true;
      entry.sentAt = Date.now();
    }
    return true;
  }
  state.outbox.push(frame);
  return false;
}

socket.addEventListener("open", () => {
  setConnection("connected");
  state.probedLogin = false;
  if (state.current) subscribe(state.current);
  for (const [id, entry] of state.pending) {
    // A new conversation we never heard back about cannot be replayed; give
    // the text back rather than guess whether the server got it.
    if (entry.type === "send" && entry.lost && !entry.conversation) giveBack(id, entry);
  }
  const queued = state.outbox.splice(0);
  for (const frame of queued) transmit(frame);
});

socket.addEventListener("close", (event) => {
  setConnection("reconnecting");
  for (const [id, entry] of state.pending) {
    if (!entry.sent) continue;
    if (entry.type === "send" && !entry.confirmed) {
      entry.lost = true;
      entry.awaitingStart = false;
    } else {
      state.pending.delete(id);
    }
  }
  state.replay = null;
  updateComposer();
  const { failures } = event.detail;
  if (failures >= 3 && !state.probedLogin) probeLogin();
});

socket.addEventListener("frame", (event) => {
  const frame = event.detail;
  const handler = HANDLERS[frame.type];
  if (handler) handler(frame);
});

/** Repeated refused handshakes usually mean the session ended; tell the user instead of retrying forever in silence. */
async function probeLogin() {
  state.probedLogin = true;
  try {
    const response = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
    if (response.redirected && /login/.test(new URL(response.url).pathname)) {
      showNotice("You have been logged out.", { href: response.url, text: "Log in again" });
    }
  } catch {
    // Offline: the reconnect loop keeps trying; nothing to add.
  }
}

function subscribe(id) {
  const subId = requestId("sub");
  const marker = `${subId}:end`;
  // Snapshots replace what we show; messages not replayed by the time the
  // marker's pong arrives are gone from the server (superseded) and go too.
  state.replay = { marker, conversation: id, stale: new Set(state.messages.keys()) };
  if (!socket.send({ type: "subscribe", id: subId, conversation: id })) {
    state.replay = null; // the open handler subscribes again
    return;
  }
  state.pending.set(subId, { type: "subscribe", conversation: id });
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
  for (const [id, entry] of state.pending) {
    if (entry.type === "send" && entry.lost && !entry.confirmed && entry.conversation === state.current) {
      giveBack(id, entry);
    }
  }
  updateComposer();
  updateEmptyState();
  scheduleRender();
}

// ---------------------------------------------------------------- frames

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
    const entry = frame.id ? state.pending.get(frame.id) : null;
    const known = Boolean(findConversationItem(conv.id));
    upsertConversation(conv);
    if (entry && entry.type === "send" && !entry.conversation) {
      adoptNewConversation(conv, entry);
    } else if (!entry && !known && !state.current) {
      // Fallback if a server does not echo `id` on this frame: a conversation
      // we have never seen, while a new-chat send is waiting, is ours.
      const waiting = [...state.pending.values()].find((e) => e.type === "send" && !e.conversation && e.sent);
      if (waiting) adoptNewConversation(conv, waiting);
    }
    if (conv.id === state.current) applyConversation(conv);
    if (entry && entry.type === "subscribe") state.pending.delete(frame.id);
  },

  message(frame) {
    if (frame.conversation !== state.current || !frame.message) return;
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
      applyMessage(msg, { reset: true });
    }
    if (snap.role === "assistant" && LIVE.has(msg.status)) clearAwaitingStart();
    updateComposer();
  },

  start(frame) {
    if (frame.conversation !== state.current || !frame.message) return;
    touchReplay(frame.message);
    let msg = state.messages.get(frame.message);
    if (!msg) msg = createMessage(frame.message, "assistant");
    msg.status = "streaming";
    msg.model = frame.model || msg.model;
    applyMessage(msg);
    clearAwaitingStart();
    updateComposer();
    announce("The assistant is replying.");
  },

  delta(frame) {
    if (frame.conversation !== state.current || !frame.message) return;
    touchReplay(frame.message);
    const seq = frame.seq;
    let msg = state.messages.get(frame.message);
    if (!msg) {
      if (seq !== 1) return resync();
      msg = createMessage(frame.message, "assistant");
      msg.status = "streaming";
      clearAwaitingStart();
      applyMessage(msg);
    }
    if (!Number.isInteger(seq) || seq <= msg.seq) return; // already contained in what we hold
    if (seq > msg.seq + 1) return resync();
    msg.seq = seq;
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
  },

  end(frame) {
    if (frame.conversation !== state.current || !frame.message) return;
    touchReplay(frame.message);
    const msg = state.messages.get(frame.message);
    if (!msg) return resync();
    // The end says how many deltas there were; if we hold fewer, fetch the tail.
    if (Number.isInteger(frame.seq) && frame.seq > msg.seq) resync();
    msg.status = frame.status || "complete";
    if (frame.usage) msg.usage = frame.usage;
    if (frame.timing) msg.timing = frame.timing;
    msg.error = normaliseError(frame.error, msg.status);
    applyMessage(msg);
    clearAwaitingStart();
    updateComposer();
    if (msg.error && msg.error.code === "upstream_unavailable") setLlm("unavailable");
    else if (msg.status === "complete") setLlm("ok");
    announce(
      msg.status === "complete"
        ? "Reply finished."
        : msg.status === "stopped"
          ? "Reply stopped."
          : `Reply failed. ${explainError(msg)}`,
    );
  },

  error(frame) {
    const entry = frame.id ? state.pending.get(frame.id) : null;
    if (entry) state.pending.delete(frame.id);
    if (frame.code === "upstream_unavailable") setLlm("unavailable");
    if (frame.conversation) {
      // A failed reply, reported to the socket that asked for it just after
      // its `end`: the reply itself already shows the error and a Retry button.
      updateComposer();
      return;
    }
    const text = friendly(frame.code, frame.message || "Something went wrong.");
    if (!entry) {
      showNotice(text);
      return;
    }
    if (entry.type === "send") {
      if (!entry.confirmed) giveBack(frame.id, entry, { notice: false });
      showNotice(text);
    } else if (entry.type === "subscribe" && frame.code === "not_found") {
      findConversationItem(entry.conversation)?.remove();
      updateSidebarEmpty();
      if (state.current === entry.conversation) {
        openConversation(null, { replace: true });
        showNotice(text);
      }
    } else if (entry.type === "stop" && frame.code === "not_found") {
      // Nothing was running any more: not worth bothering the user.
    } else {
      showNotice(text);
    }
    updateComposer();
  },
};

function normaliseError(error, status) {
  if (error && typeof error === "object") return { code: error.code || "", message: error.message || "" };
  if (typeof error === "string" && error) return { code: "", message: error };
  if (status === "interrupted") return { code: "interrupted", message: "" };
  if (status === "error") return { code: "", message: "" };
  return null;
}

function explainError(msg) {
  const code = msg.error && msg.error.code;
  if (code && FRIENDLY[code]) return FRIENDLY[code];
  if (msg.status === "interrupted") return FRIENDLY.interrupted;
  return "The reply could not be completed.";
}

function clearAwaitingStart() {
  for (const [id, entry] of state.pending) {
    if ((entry.type === "send" || entry.type === "regenerate") && entry.conversation === state.current) {
      entry.awaitingStart = false;
      if (entry.type === "regenerate" || entry.confirmed) state.pending.delete(id);
    }
  }
}

// ---------------------------------------------------------------- messages

class Msg {
  constructor(id, role, el) {
    this.id = id;
    this.role = role;
    this.el = el;
    this.content = "";
    this.reasoning = "";
    this.status = role === "user" ? "complete" : "pending";
    this.model = "";
    this.seq = 0;
    this.usage = null;
    this.timing = null;
    this.error = null;
    this.reasoningToggledByUser = false;
    this.view = role === "assistant" ? new MarkdownView($(".content", el)) : null;
  }
}

function createMessage(id, role) {
  const template = role === "user" ? els.tplUser : els.tplAssistant;
  const el = template.content.firstElementChild.cloneNode(true);
  el.dataset.id = id;
  if (role === "assistant") {
    // Only one reply follows a user message: an assistant message right
    // before a new one was replaced by a regenerate.
    const previous = els.messages.lastElementChild;
    if (previous && previous.classList.contains("assistant")) removeMessage(previous.dataset.id, previous);
  }
  els.messages.append(el);
  const msg = new Msg(id, role, el);
  state.messages.set(id, msg);
  updateEmptyState();
  return msg;
}

function removeMessage(id, el = null) {
  const msg = id ? state.messages.get(id) : null;
  if (msg) {
    state.messages.delete(id);
    dirty.delete(msg);
    msg.el.remove();
  }
  if (el) el.remove();
}

function clearMessages() {
  state.messages.clear();
  dirty.clear();
  els.messages.replaceChildren();
  state.replay = null;
  state.stick = true;
  updateEmptyState();
}

function adoptUserBubble(snap, requestId) {
  const candidates = [...state.pending.entries()].filter(
    ([, e]) => e.type === "send" && !e.confirmed && e.bubble && (e.conversation || null) === state.current,
  );
  if (!candidates.length) return null;
  // The answer to our send carries our request id. Without it (a replay after
  // a reconnect) match by text: a message typed in another tab is not ours.
  const same =
    candidates.find(([id]) => requestId && id === requestId) ||
    candidates.find(([, e]) => e.content.trim() === (snap.content || "").trim());
  if (!same) return null;
  const [, entry] = same;
  entry.confirmed = true;
  entry.lost = false;
  const el = entry.bubble;
  el.classList.remove("pending");
  el.dataset.id = snap.id;
  const msg = new Msg(snap.id, "user", el);
  state.messages.set(snap.id, msg);
  return msg;
}

/** Bring the DOM of one message in line with its state. */
function applyMessage(msg, { reset = false } = {}) {
  const el = msg.el;
  el.dataset.status = msg.status;
  if (msg.role === "user") {
    $(".content", el).textContent = msg.content; // never markdown: it is what the user typed
    return;
  }
  const details = $(".reasoning", el);
  const reasoningText = $(".reasoning-text", el);
  // The markdown view needs no reset: it diffs the new text against what it shows.
  if (reset) reasoningText.textContent = msg.reasoning;
  details.hidden = !msg.reasoning;
  $(".reasoning-label", el).textContent = LIVE.has(msg.status) && !msg.content ? "Thinking…" : "Thinking";
  if (!msg.reasoningToggledByUser) details.open = LIVE.has(msg.status) && !msg.content;

  $(".meta-model", el).textContent = msg.model || "";
  const usage = msg.usage || {};
  const timing = msg.timing || {};
  setMeta($(".meta-tokens", el), Number.isFinite(usage.completion_tokens) ? `${usage.completion_tokens} tokens` : "");
  setMeta($(".meta-ttft", el), Number.isFinite(timing.ttft_ms) ? `first token ${formatSeconds(timing.ttft_ms)}` : "");
  setMeta($(".meta-speed", el), Number.isFinite(timing.tokens_per_s) ? `${timing.tokens_per_s.toFixed(1)} tok/s` : "");
  setMeta($(".meta-status", el), msg.status === "stopped" ? "Stopped" : "");

  const failed = FAILED.has(msg.status);
  const errorBox = $(".message-error", el);
  errorBox.hidden = !failed;
  if (failed) {
    $(".error-text", errorBox).textContent = explainError(msg);
    const detail = msg.error && msg.error.message ? msg.error.message : "";
    const detailEl = $(".error-detail", errorBox);
    detailEl.textContent = detail;
    detailEl.hidden = !detail;
  }
  scheduleRender(msg);
}

function setMeta(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function formatSeconds(ms) {
  return ms < 10_000 ? `${(ms / 1000).toFixed(2)} s` : `${(ms / 1000).toFixed(1)} s`;
}

function appendReasoning(msg, text) {
  msg.reasoning += text;
  const el = msg.el;
  const details = $(".reasoning", el);
  const body = $(".reasoning-text", el);
  // Appending to one text node is far cheaper than resetting textContent per token.
  const node = body.lastChild;
  if (node && node.nodeType === Node.TEXT_NODE) node.appendData(text);
  else body.append(text);
  if (details.hidden) {
    details.hidden = false;
    $(".reasoning-label", el).textContent = "Thinking…";
    if (!msg.reasoningToggledByUser && !msg.content) details.open = true;
  }
  scheduleRender(null);
}

function collapseReasoningForAnswer(msg) {
  const details = $(".reasoning", msg.el);
  $(".reasoning-label", msg.el).textContent = "Thinking";
  if (!msg.reasoningToggledByUser) details.open = false;
}

// Rendering is batched: frames only change state and mark messages dirty;
// markdown is rebuilt at most once per animation frame (less often when a
// render is slow), so a fast stream never re-renders per token.
const dirty = new Set();
let frameToken = 0;
let frameQueued = false;
let nextFrameAt = 0;

function scheduleRender(msg) {
  if (msg) dirty.add(msg);
  if (frameQueued) return;
  frameQueued = true;
  const token = (frameToken += 1);
  const run = () => {
    if (token !== frameToken || !frameQueued) return;
    frameQueued = false;
    flushRender();
  };
  const go = () => {
    requestAnimationFrame(run);
    // Hidden tabs get no animation frames; keep them roughly current anyway.
    setTimeout(run, 250);
  };
  const wait = nextFrameAt - performance.now();
  if (wait > 0) setTimeout(go, wait);
  else go();
}

function flushRender() {
  const started = performance.now();
  for (const msg of dirty) {
    if (!state.messages.has(msg.id)) continue;
    msg.view.update(msg.content, { final: !LIVE.has(msg.status) });
    msg.el.classList.toggle("has-content", msg.content.length > 0);
  }
  dirty.clear();
  followBottom();
  const took = performance.now() - started;
  nextFrameAt = performance.now() + Math.min(250, took * 3);
}

// ---------------------------------------------------------------- scrolling

const NEAR_BOTTOM_PX = 48;

function distanceFromBottom() {
  const s = els.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight;
}

let lastScrollTop = 0;

function followBottom() {
  if (state.stick) els.scroller.scrollTop = els.scroller.scrollHeight;
  lastScrollTop = els.scroller.scrollTop;
  els.jump.hidden = state.stick || distanceFromBottom() <= NEAR_BOTTOM_PX;
}

els.scroller.addEventListener("scroll", () => {
  const top = els.scroller.scrollTop;
  // Only a move upwards lets go of the bottom: content growing under a view
  // that we are about to scroll down again must not count as "scrolled up".
  if (distanceFromBottom() <= NEAR_BOTTOM_PX) state.stick = true;
  else if (top < lastScrollTop - 2) state.stick = false;
  lastScrollTop = top;
  els.jump.hidden = state.stick;
}, { passive: true });

els.jump.addEventListener("click", () => {
  state.stick = true;
  followBottom();
  els.prompt.focus({ preventScroll: true });
});

// ---------------------------------------------------------------- composer

function isBusy() {
  for (const msg of state.messages.values()) {
    if (msg.role === "assistant" && LIVE.has(msg.status)) return true;
  }
  for (const entry of state.pending.values()) {
    if ((entry.type === "send" || entry.type === "regenerate") && entry.awaitingStart &&
        (entry.conversation || null) === state.current) {
      return true;
    }
  }
  return false;
}

function updateComposer() {
  const busy = isBusy();
  els.prompt.disabled = busy;
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.messages.toggleAttribute("data-busy", busy);
  placeReplyActions(busy);
  if (state.wasBusy && !busy) {
    const active = document.activeElement;
    if (!active || active === document.body || active === els.stop) els.prompt.focus();
  }
  state.wasBusy = busy;
}

function placeReplyActions(busy = isBusy()) {
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
  if (content.length > MAX_CONTENT) {
    showNotice(FRIENDLY.too_large);
    return;
  }
  hideNotice();
  const id = requestId("send");
  const frame = { type: "send", id, conversation: state.current, content };
  const model = els.model.value;
  if (model) frame.model = model;
  // For an existing conversation the system prompt is saved through the
  // settings endpoint; a new one takes it with its first message.
  if (!state.current) frame.system = els.system.value;

  const bubble = els.tplUser.content.firstElementChild.cloneNode(true);
  bubble.classList.add("pending");
  $(".content", bubble).textContent = content;
  els.messages.append(bubble);
  state.pending.set(id, {
    type: "send",
    conversation: state.current,
    content,
    bubble,
    awaitingStart: true,
    confirmed: false,
    sent: false,
  });
  els.prompt.value = "";
  autoGrow();
  state.stick = true;
  updateEmptyState();
  transmit(frame);
  updateComposer();
  scheduleRender(null);
}

/** Undo an unconfirmed send: drop its bubble and put the text back to be sent again. */
function giveBack(id, entry, { notice = true } = {}) {
  state.pending.delete(id);
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
  const queuedIndex = state.outbox.findIndex((f) => f.type === "send" && (f.conversation || null) === state.current);
  if (queuedIndex >= 0) {
    const [frame] = state.outbox.splice(queuedIndex, 1);
    const entry = state.pending.get(frame.id);
    if (entry) giveBack(frame.id, entry, { notice: false });
    return;
  }
  if (!state.current) {
    // The conversation does not exist yet; stop it as soon as we learn its id.
    for (const entry of state.pending.values()) {
      if (entry.type === "send" && !entry.conversation) entry.stopRequested = true;
    }
    return;
  }
  const id = requestId("stop");
  state.pending.set(id, { type: "stop", conversation: state.current });
  transmit({ type: "stop", id, conversation: state.current });
}

function regenerate() {
  if (!state.current || isBusy()) return;
  hideNotice();
  const id = requestId("regen");
  state.pending.set(id, { type: "regenerate", conversation: state.current, awaitingStart: true });
  transmit({ type: "regenerate", id, conversation: state.current });
  state.stick = true;
  updateComposer();
}

const growsNatively = window.CSS && CSS.supports && CSS.supports("field-sizing", "content");

function autoGrow() {
  if (growsNatively) return;
  const p = els.prompt;
  p.style.height = "auto";
  p.style.height = `${Math.min(p.scrollHeight + 2, Math.round(window.innerHeight * 0.4))}px`;
}

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

els.messages.addEventListener("click", async (event) => {
  const target = event.target;
  const button = target.closest("button");
  if (button) {
    const article = button.closest(".message");
    const msg = article ? state.messages.get(article.dataset.id) : null;
    if (button.classList.contains("copy-code")) {
      const code = button.closest(".code-block")?.querySelector("code");
      if (code) flashButton(button, await copyText(code.textContent));
    } else if (button.classList.contains("copy-answer") && msg) {
      flashButton(button, await copyText(msg.content));
    } else if (button === replyActions.regenerate || button === replyActions.retry) {
      regenerate();
    }
    return;
  }
  const summary = target.closest(".reasoning > summary");
  if (summary) {
    const msg = state.messages.get(summary.closest(".message")?.dataset.id);
    if (msg) msg.reasoningToggledByUser = true;
  }
});

// ---------------------------------------------------------------- header, models, settings

function setConnection(status) {
  els.connection.dataset.state = status;
  els.connection.textContent = status === "connected" ? "connected" : status === "reconnecting" ? "reconnecting…" : "connecting…";
}

function setLlm(status) {
  state.llm = status;
  els.llm.hidden = status !== "unavailable";
  root.dataset.llm = status;
}

function setTitle(title) {
  const shown = title || "New chat";
  els.title.textContent = shown;
  document.title = `${shown} · ${SITE_NAME}`;
}

function wantedModel() {
  if (state.current) return state.currentModel || state.defaultModel;
  return state.newChatModel || state.defaultModel;
}

function fillModels() {
  const want = wantedModel();
  const names = [...state.models];
  const select = els.model;
  select.replaceChildren();
  if (want && !names.includes(want)) {
    // Still show a model the server no longer lists, so the user sees what
    // this conversation used and that it is missing.
    const option = new Option(state.models.length ? `${want} (not on server)` : want, want);
    select.append(option);
  }
  for (const name of names) select.append(new Option(name, name));
  if (!select.options.length) select.append(new Option("No models available", ""));
  select.value = want && [...select.options].some((o) => o.value === want) ? want : select.options[0].value;
}

function selectModel(name) {
  if (!name) return;
  if (![...els.model.options].some((o) => o.value === name)) {
    els.model.prepend(new Option(state.models.length ? `${name} (not on server)` : name, name));
  }
  els.model.value = name;
}

function applyConversation(conv) {
  setTitle(conv.title);
  if (conv.model) {
    state.currentModel = conv.model;
    if (document.activeElement !== els.model) selectModel(conv.model);
  }
  if (!state.systemDirty && typeof conv.system === "string") {
    els.system.value = conv.system;
    state.systemLoaded = true;
  }
}

async function saveSettings({ quiet = false } = {}) {
  if (!state.current) {
    setSettingsStatus("Used when you send the first message.");
    return;
  }
  const id = state.current;
  const system = els.system.value;
  const fields = { model: els.model.value };
  // Until the conversation frame has told us the saved prompt, an empty box
  // means "unknown", not "clear it".
  if (state.systemLoaded || state.systemDirty) fields.system = system;
  setSettingsStatus("Saving…");
  try {
    const conv = await postForm(`${conversationUrl(id)}settings/`, fields);
    if (els.system.value === system) state.systemDirty = false;
    if (conv && conv.id) {
      upsertConversation(conv);
      if (conv.id === state.current) applyConversation(conv);
    }
    setSettingsStatus(quiet ? "" : "Saved.");
  } catch (error) {
    setSettingsStatus("");
    showNotice(error.code === "not_found" ? FRIENDLY.not_found : "Could not save the settings. Try again.");
  }
}

function setSettingsStatus(text) {
  els.settingsStatus.textContent = text;
}

els.model.addEventListener("change", () => {
  if (state.current) {
    state.currentModel = els.model.value;
    saveSettings({ quiet: true });
  } else {
    state.newChatModel = els.model.value;
  }
});

els.system.addEventListener("input", () => {
  state.systemDirty = true;
  setSettingsStatus("");
});

els.saveSettings.addEventListener("click", () => saveSettings());

function showNotice(text, link = null) {
  els.noticeText.textContent = text;
  if (link) {
    els.noticeLink.href = link.href;
    els.noticeLink.textContent = link.text;
  }
  els.noticeLink.hidden = !link;
  els.notice.hidden = false;
}

function hideNotice() {
  els.notice.hidden = true;
}

els.noticeDismiss.addEventListener("click", () => {
  hideNotice();
  els.prompt.focus();
});

function announce(text) {
  // Clearing first makes screen readers repeat an identical announcement.
  els.announcer.textContent = "";
  setTimeout(() => {
    els.announcer.textContent = text;
  }, 50);
}

function updateEmptyState() {
  els.empty.hidden = Boolean(state.current) || els.messages.childElementCount > 0;
}

// ---------------------------------------------------------------- sidebar

function findConversationItem(id) {
  return id ? els.list.querySelector(`li[data-id="${CSS.escape(id)}"]`) : null;
}

function updateSidebarEmpty() {
  els.noConversations.hidden = els.list.childElementCount > 0;
}

function markActive() {
  for (const li of els.list.children) {
    const link = $(".conversation-link", li);
    if (li.dataset.id === state.current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function upsertConversation(conv) {
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

function adoptNewConversation(conv, entry) {
  entry.conversation = conv.id;
  if (entry.stopRequested) transmit({ type: "stop", conversation: conv.id });
  if (state.current) return; // the user moved on to another conversation meanwhile
  state.current = conv.id;
  state.currentModel = conv.model || els.model.value;
  history.pushState({ conversation: conv.id }, "", conversationUrl(conv.id));
  markActive();
  updateEmptyState();
}

function openConversation(id, { push = true, replace = false } = {}) {
  id = id || null;
  if (id === state.current) {
    setSidebar(false);
    els.prompt.focus();
    return;
  }
  if (state.current && socket.isOpen) socket.send({ type: "unsubscribe", conversation: state.current });
  // Unconfirmed bubbles belong to the conversation we are leaving.
  for (const [reqId, entry] of state.pending) {
    if (entry.bubble && !entry.confirmed) entry.bubble = null;
    if (entry.type === "subscribe") state.pending.delete(reqId);
  }
  state.current = id;
  state.systemDirty = false;
  state.systemLoaded = !id;
  clearMessages();
  hideNotice();
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
  const url = id ? conversationUrl(id) : "/";
  if (replace) history.replaceState({ conversation: id }, "", url);
  else if (push) history.pushState({ conversation: id }, "", url);
  markActive();
  updateComposer();
  setSidebar(false);
  els.prompt.focus();
}

window.addEventListener("popstate", () => openConversation(idFromPath(location.pathname), { push: false }));

els.newChat.addEventListener("click", () => openConversation(null));

els.list.addEventListener("click", (event) => {
  const li = event.target.closest("li[data-id]");
  if (!li) return;
  if (event.target.closest(".rename")) {
    startRename(li);
  } else if (event.target.closest(".delete")) {
    deleteConversation(li);
  } else if (event.target.closest(".conversation-link")) {
    // Let the browser handle new-tab and new-window clicks.
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    openConversation(li.dataset.id);
  }
});

function startRename(li) {
  if (li.classList.contains("renaming")) return;
  const link = $(".conversation-link", li);
  const titleEl = $(".conversation-title", li);
  const old = titleEl.textContent;
  const input = document.createElement("input");
  input.type = "text";
  input.className = "rename-input";
  input.value = old;
  input.maxLength = 200;
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
      const data = await postForm(`${conversationUrl(li.dataset.id)}rename/`, { title });
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

async function deleteConversation(li) {
  const title = $(".conversation-title", li).textContent;
  if (!window.confirm(`Delete “${title}”? This cannot be undone.`)) return;
  const id = li.dataset.id;
  try {
    await postForm(`${conversationUrl(id)}delete/`);
  } catch (error) {
    if (error.code !== "not_found") {
      showNotice("Could not delete the conversation.");
      return;
    }
  }
  const next = li.nextElementSibling || li.previousElementSibling;
  li.remove();
  updateSidebarEmpty();
  if (state.current === id) openConversation(null, { replace: true });
  else ($(".delete", next || document.body) || els.newChat).focus();
}

function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  els.sidebarToggle.setAttribute("aria-expanded", String(open));
}

els.sidebarToggle.addEventListener("click", () => {
  setSidebar(!document.body.classList.contains("sidebar-open"));
});
els.sidebarBackdrop.addEventListener("click", () => setSidebar(false));

// ---------------------------------------------------------------- start

// A request the server never answers must not leave the composer locked.
setInterval(() => {
  const now = Date.now();
  let changed = false;
  for (const [id, entry] of state.pending) {
    if (entry.awaitingStart && entry.sent && now - entry.sentAt > 60_000) {
      entry.awaitingStart = false;
      if (!entry.bubble || entry.confirmed) state.pending.delete(id);
      changed = true;
    }
  }
  if (changed) {
    updateComposer();
    showNotice("The server did not answer. Try again.");
  }
}, 5_000);

history.replaceState({ conversation: state.current }, "", location.href);
setTitle(state.current ? root.dataset.conversationTitle : "");
setConnection("connecting");
fillModels();
markActive();
updateSidebarEmpty();
updateEmptyState();
updateComposer();
refreshRelativeTimes(els.list);
autoGrow();
els.prompt.focus();
socket.start();
