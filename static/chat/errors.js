// Errors and notices: the protocol's error codes in words a user understands,
// the dismissable notice above the conversation, and screen reader announcements.

import { config, els, state } from "./page.js";

// Words a user understands, per error code of the protocol.
export const FRIENDLY = {
  upstream_unavailable: "The model server is not reachable. Is it running?",
  model_not_found: "This model is not installed on the model server.",
  timeout: "The model server took too long to answer.",
  upstream_error: "The model server reported an error while answering.",
  busy: "A reply is already being written in this conversation. Wait for it or press Stop.",
  busy_elsewhere:
    "A reply is still being written on another version of this conversation. Your message is back in the input box.",
  rate_limited: "You are sending messages too quickly. Wait a moment and try again.",
  too_large: `That message is too long (the limit is ${config.maxContent.toLocaleString("en")} characters).`,
  bad_request: "The server did not understand that request.",
  not_found: "This conversation does not exist or was deleted.",
  server_error: "Something went wrong on the server. Try again.",
  interrupted: "The reply was cut off before it finished (the server restarted or lost the model server).",
};

export const friendly = (code, fallback = "Something went wrong.") => FRIENDLY[code] || fallback;

/** What to tell the user about an `error` frame; a rate limit says how long to wait when the server knows. */
export function errorText(frame) {
  const wait = frame.retry_after;
  if (frame.code === "rate_limited" && Number.isInteger(wait) && wait >= 1) {
    return `You're sending too fast — try again in ${wait} s.`;
  }
  return friendly(frame.code, frame.message || "Something went wrong.");
}

/** A message's or frame's error in one shape, {code, message}; null when there is none. */
export function normaliseError(error, status) {
  if (error && typeof error === "object") return { code: error.code || "", message: error.message || "" };
  if (typeof error === "string" && error) return { code: "", message: error };
  if (status === "interrupted") return { code: "interrupted", message: "" };
  if (status === "error") return { code: "", message: "" };
  return null;
}

export function explainError(msg) {
  const code = msg.error && msg.error.code;
  if (code && FRIENDLY[code]) return FRIENDLY[code];
  if (msg.status === "interrupted") return FRIENDLY.interrupted;
  return "The reply could not be completed.";
}

// What the notice's button does, while the notice offers one.
let noticeAction = null;

/** Show text in the notice, with an optional link ({href, text}) or button ({text, run}). */
export function showNotice(text, link = null, action = null) {
  els.noticeText.textContent = text;
  if (link) {
    els.noticeLink.href = link.href;
    els.noticeLink.textContent = link.text;
  }
  els.noticeLink.hidden = !link;
  noticeAction = action;
  if (action) els.noticeAction.textContent = action.text;
  els.noticeAction.hidden = !action;
  els.notice.hidden = false;
}

export function hideNotice() {
  els.notice.hidden = true;
  noticeAction = null;
}

export function announce(text) {
  // Clearing first makes screen readers repeat an identical announcement.
  els.announcer.textContent = "";
  setTimeout(() => {
    els.announcer.textContent = text;
  }, 50);
}

/**
 * Repeated refused handshakes usually mean the session ended; tell the user instead of retrying forever in silence.
 * Resolves to false when the session has ended (the notice says `message`), true when it has not, null if offline.
 */
export async function probeLogin(message = "You have been logged out.") {
  state.probedLogin = true;
  try {
    const response = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
    if (response.redirected && /login/.test(new URL(response.url).pathname)) {
      showNotice(message, { href: response.url, text: "Log in again" });
      return false;
    }
    return true;
  } catch {
    // Offline: the reconnect loop keeps trying; nothing to add.
    return null;
  }
}

export function installNotices() {
  els.noticeDismiss.addEventListener("click", () => {
    hideNotice();
    els.prompt.focus();
  });
  els.noticeAction.addEventListener("click", () => {
    const action = noticeAction;
    hideNotice();
    if (action) action.run();
  });
}
