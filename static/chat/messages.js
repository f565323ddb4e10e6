// The messages of the conversation on screen: one Msg per message, its DOM
// kept in line with its state, and markdown rendering batched per frame.

import { copyText, flashButton } from "./common.js";
import { explainError } from "./errors.js";
import { MarkdownView } from "./markdown.js";
import { $, els, LIVE, FAILED, replyActions, state } from "./page.js";
import { pending } from "./requests.js";
import { followBottom } from "./scroll.js";
import { forgetPath, showVersions } from "./versions.js";

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
    this.finishReason = "";
    this.feedback = null; // {rating: "up"|"down", comment}, as the server last said
    this.siblings = [id]; // the ids of this message's versions, oldest first, itself included
    this.reasoningToggledByUser = false;
    this.view = role === "assistant" ? new MarkdownView($(".content", el)) : null;
  }
}

export function createMessage(id, role) {
  const template = role === "user" ? els.tplUser : els.tplAssistant;
  const el = template.content.firstElementChild.cloneNode(true);
  el.dataset.id = id;
  // The server rendered the saved messages as plain text: take the place of one.
  const saved = [...els.messages.querySelectorAll(":scope > article.saved")].find((a) => a.dataset.id === id);
  if (saved) {
    saved.replaceWith(el);
  } else if (role === "assistant") {
    // Only one reply follows a user message: an assistant message right
    // before a new one was replaced by a regenerate.
    const previous = els.messages.lastElementChild;
    if (previous && previous.classList.contains("assistant")) removeMessage(previous.dataset.id, previous);
  }
  if (!saved) els.messages.append(el);
  const msg = new Msg(id, role, el);
  state.messages.set(id, msg);
  updateEmptyState();
  return msg;
}

export function removeMessage(id, el = null) {
  const msg = id ? state.messages.get(id) : null;
  if (msg) {
    state.messages.delete(id);
    dirty.delete(msg);
    msg.el.remove();
  }
  if (el) el.remove();
}

export function clearMessages() {
  state.messages.clear();
  dirty.clear();
  els.messages.replaceChildren();
  state.replay = null;
  state.stick = true;
  forgetPath();
  updateEmptyState();
}

/** The bubble of our own unconfirmed send becomes the message `snap` when it is ours; null otherwise. */
export function adoptUserBubble(snap, requestId) {
  const candidates = [...pending].filter(
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
export function applyMessage(msg, { reset = false } = {}) {
  const el = msg.el;
  el.dataset.status = msg.status;
  showVersions(msg);
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

  showWaiting(msg);

  $(".meta-model", el).textContent = msg.model || "";
  const usage = msg.usage || {};
  const timing = msg.timing || {};
  setMeta($(".meta-tokens", el), Number.isFinite(usage.completion_tokens) ? `${usage.completion_tokens} tokens` : "");
  setMeta($(".meta-ttft", el), Number.isFinite(timing.ttft_ms) ? `first token ${formatSeconds(timing.ttft_ms)}` : "");
  setMeta($(".meta-speed", el), Number.isFinite(timing.tokens_per_s) ? `${timing.tokens_per_s.toFixed(1)} tok/s` : "");
  // "length": the reply reached max_tokens or the site's length cap.
  const cut = msg.status === "complete" && msg.finishReason === "length";
  setMeta($(".meta-status", el), msg.status === "stopped" ? "Stopped" : cut ? "Cut off at the length limit" : "");

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
  showFeedback(msg);
  scheduleRender(msg);
}

/** A reply's thumbs, pressed as its feedback stands: on finished replies with an answer to rate
 *  (a reply that failed before any text offers only Retry). */
export function showFeedback(msg) {
  if (msg.role !== "assistant") return;
  const box = $(".feedback", msg.el);
  box.hidden = LIVE.has(msg.status) || (!msg.content && !msg.feedback);
  const rating = msg.feedback ? msg.feedback.rating : null;
  for (const button of box.querySelectorAll("button.rate")) {
    button.setAttribute("aria-pressed", String(button.dataset.rating === rating));
  }
  $(".feedback-comment-open", box).hidden = !rating;
  const form = $(".feedback-comment", msg.el);
  if (!rating) form.hidden = true;
  // The box follows the server (another tab's comment), but never overwrites
  // what the user has begun to type in it.
  const comment = $("textarea", form);
  const typing = document.activeElement === comment && comment.value !== (comment.dataset.shown ?? "");
  if (typing) return;
  comment.value = msg.feedback ? msg.feedback.comment : "";
  comment.dataset.shown = comment.value;
}

/** A `feedback` field or frame as the page keeps it: null unless it holds a rating. */
export function normaliseFeedback(feedback) {
  if (!feedback || (feedback.rating !== "up" && feedback.rating !== "down")) return null;
  return { rating: feedback.rating, comment: typeof feedback.comment === "string" ? feedback.comment : "" };
}

/** Rate a reply (or, rating null, take the rating back): shown at once, put right by the server's answer. */
function sendFeedback(msg, rating, comment = "") {
  const conversation = state.current;
  const id = pending.add("feedback", { type: "feedback", conversation, message: msg.id, previous: msg.feedback });
  msg.feedback = rating ? { rating, comment } : null;
  showFeedback(msg);
  const frame = { type: "feedback", id, conversation, message: msg.id, rating };
  pending.transmit(rating ? { ...frame, comment } : frame);
}

function openComment(msg) {
  const form = $(".feedback-comment", msg.el);
  form.hidden = false;
  $("textarea", form).focus();
}

/** Between `start` and the first delta the model may be loading or reading a long prompt: say so. */
export function showWaiting(msg) {
  $(".waiting", msg.el).hidden = !(LIVE.has(msg.status) && msg.seq === 0);
}

function setMeta(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function formatSeconds(ms) {
  return ms < 10_000 ? `${(ms / 1000).toFixed(2)} s` : `${(ms / 1000).toFixed(1)} s`;
}

export function appendReasoning(msg, text) {
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

export function collapseReasoningForAnswer(msg) {
  const details = $(".reasoning", msg.el);
  $(".reasoning-label", msg.el).textContent = "Thinking";
  if (!msg.reasoningToggledByUser) details.open = false;
}

export function updateEmptyState() {
  els.empty.hidden = Boolean(state.current) || els.messages.childElementCount > 0;
}

// Rendering is batched: frames only change state and mark messages dirty;
// markdown is rebuilt at most once per animation frame (less often when a
// render is slow), so a fast stream never re-renders per token.
const dirty = new Set();
let frameToken = 0;
let frameQueued = false;
let nextFrameAt = 0;

export function scheduleRender(msg) {
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

/** Render what is waiting at once, not at the next frame: for the saved messages, before the first paint. */
export function renderNow() {
  frameQueued = false;
  flushRender();
}

function flushRender() {
  const started = performance.now();
  for (const msg of dirty) {
    if (!state.messages.has(msg.id)) continue;
    msg.view.update(msg.content, { final: !LIVE.has(msg.status) });
    msg.el.classList.toggle("has-content", msg.content.length > 0);
    // Nothing to copy from a reply that failed (or has not begun) without text.
    $(".copy-answer", msg.el).hidden = msg.content.length === 0;
  }
  dirty.clear();
  followBottom();
  const took = performance.now() - started;
  nextFrameAt = performance.now() + Math.min(250, took * 3);
}

/** The buttons inside messages: copy a code block or an answer, regenerate or retry the last reply. */
export function installMessages({ regenerate }) {
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
      } else if (button.classList.contains("rate") && msg) {
        // Pressing the pressed thumb again takes the rating back.
        const rating = button.dataset.rating;
        if (msg.feedback && msg.feedback.rating === rating) {
          sendFeedback(msg, null);
        } else {
          sendFeedback(msg, rating, msg.feedback ? msg.feedback.comment : "");
          openComment(msg);
        }
      } else if (button.classList.contains("feedback-comment-open") && msg) {
        openComment(msg);
      } else if (button.classList.contains("feedback-comment-close")) {
        button.closest(".feedback-comment").hidden = true;
        $(".feedback-comment-open", article)?.focus();
      }
      return;
    }
    const summary = target.closest(".reasoning > summary");
    if (summary) {
      const msg = state.messages.get(summary.closest(".message")?.dataset.id);
      if (msg) msg.reasoningToggledByUser = true;
    }
  });

  els.messages.addEventListener("submit", (event) => {
    const form = event.target.closest(".feedback-comment");
    if (!form) return;
    event.preventDefault();
    const msg = state.messages.get(form.closest(".message")?.dataset.id);
    if (!msg || !msg.feedback) return;
    const comment = $("textarea", form);
    sendFeedback(msg, msg.feedback.rating, comment.value.trim());
    form.hidden = true;
    $(".feedback-comment-open", msg.el).focus();
  });
}
