// Helpers shared by every page, plus two behaviours wired by data attributes
// so that templates never need inline event handlers (keeps a strict CSP possible).

/**
 * Copy text to the clipboard. navigator.clipboard only exists in secure
 * contexts, and a self-hosted chat is often reached over plain http on a LAN,
 * so fall back to the old selection-based copy there.
 */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Permission denied or document not focused: try the fallback below.
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "visually-hidden";
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

/** Briefly show "Copied" on a button so the user gets feedback without a dialog. */
export function flashButton(button, ok) {
  const label = button.dataset.label || button.textContent;
  button.dataset.label = label;
  button.textContent = ok ? "Copied" : "Copy failed";
  clearTimeout(button._flashTimer);
  button._flashTimer = setTimeout(() => {
    button.textContent = button.dataset.label;
  }, 1500);
}

const MINUTE = 60;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

/** Short relative time ("2 min ago"); older dates fall back to a calendar date. */
export function relativeTime(date, now = new Date()) {
  const d = date instanceof Date ? date : new Date(date);
  if (Number.isNaN(d.getTime())) return "";
  const s = Math.max(0, Math.round((now - d) / 1000));
  if (s < 45) return "just now";
  if (s < HOUR) return `${Math.max(1, Math.round(s / MINUTE))} min ago`;
  if (s < DAY) return `${Math.round(s / HOUR)} h ago`;
  if (s < 2 * DAY) return "yesterday";
  if (s < 7 * DAY) return `${Math.floor(s / DAY)} days ago`;
  const sameYear = d.getFullYear() === now.getFullYear();
  return d.toLocaleDateString(undefined, {
    month: "short",
    day: "numeric",
    ...(sameYear ? {} : { year: "numeric" }),
  });
}

/** Re-render every <time data-relative> below root; called on a timer so labels stay current. */
export function refreshRelativeTimes(root = document) {
  const now = new Date();
  for (const el of root.querySelectorAll("time[data-relative]")) {
    const label = relativeTime(el.getAttribute("datetime"), now);
    if (label && el.textContent !== label) el.textContent = label;
    if (!el.title) {
      const d = new Date(el.getAttribute("datetime"));
      if (!Number.isNaN(d.getTime())) el.title = d.toLocaleString();
    }
  }
}

/**
 * Django's CSRF token, from a {% csrf_token %} field on the page (every page
 * has one in its log-out form): the cookie is HttpOnly, out of a script's reach.
 */
function csrfToken() {
  const field = document.querySelector("input[name=csrfmiddlewaretoken]");
  return field ? field.value : "";
}

class HttpError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

/** POST form fields to a JSON endpoint of ours; rejects with HttpError on a non-2xx answer. */
export async function postForm(url, fields = {}) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
    body: new URLSearchParams(fields),
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    throw new HttpError(response.status, data && data.error, data && data.message);
  }
  return data;
}

// Delegated behaviours, installed once per page. A hashed static URL in the
// template and a plain relative import can load this file twice, hence the flag.
function installPageBehaviours() {
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-copy-target]");
    if (!button) return;
    const source = document.getElementById(button.dataset.copyTarget);
    if (!source) return;
    const text = "value" in source ? source.value : source.textContent;
    flashButton(button, await copyText(text.trim()));
  });

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });

  refreshRelativeTimes();
  setInterval(() => refreshRelativeTimes(), 30_000);
}

if (!document.documentElement.dataset.commonInstalled) {
  document.documentElement.dataset.commonInstalled = "1";
  installPageBehaviours();
}
