// The notice that staff opened the conversation on screen (review/models.py,
// CHAT_SHOW_REVIEWS). The server lists when each of the user's conversations
// was last reviewed in #reviews, so switching conversations in the page
// shows the right notice without a reload.

import { $, els, root } from "./page.js";

const reviews = JSON.parse($("#reviews")?.textContent || "{}");
const when = new Intl.DateTimeFormat(undefined, { dateStyle: "long", timeStyle: "short" });

/** Show the notice for conversation `id` (null for a new chat), or hide it. */
export function showReviewNotice(id) {
  const notice = els.reviewNotice;
  if (!notice) return;
  const seen = id ? reviews[id] : null;
  notice.hidden = !seen;
  if (!seen) return;
  const time = $("time", notice);
  time.dateTime = seen.last;
  time.textContent = when.format(new Date(seen.last));
  $(".review-times", notice).textContent = seen.times > 1 ? ` (${seen.times} times)` : "";
}

// In the reader's own time zone and language, as the sidebar's times are.
showReviewNotice(root.dataset.conversation || null);
