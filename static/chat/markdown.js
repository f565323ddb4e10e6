// Markdown rendering for model output: parse with marked, sanitise with
// DOMPurify, then make the result inert and pleasant (no remote images, safe
// links, highlighted code with a copy button).
//
// Model output is untrusted: anyone who can get text in front of the model
// (a pasted document, a web page) can steer what it writes. So raw HTML in the
// markdown is shown as text, and the sanitiser runs anyway as a second wall.

import { Marked } from "../vendor/marked-18.2.1/marked.esm.js";
import DOMPurify from "../vendor/dompurify-3.4.18/purify.es.js";
import hljs from "../vendor/highlightjs-11.12.0/highlight.min.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    html({ text, block }) {
      // <br> is the one tag models routinely put in table cells; anything
      // else is shown literally rather than interpreted.
      if (!block && /^<br\s*\/?>$/i.test(text.trim())) return "<br>";
      return block ? `<div class="raw-html">${escapeHtml(text)}</div>` : escapeHtml(text);
    },
  },
});

// A private DOMPurify instance, so our hooks never affect anyone else's use.
const purify = DOMPurify(window);

const PURIFY_CONFIG = {
  USE_PROFILES: { html: true }, // no SVG or MathML at all
  FORBID_TAGS: [
    "style", "form", "input", "button", "textarea", "select", "option", "label",
    "iframe", "frame", "frameset", "object", "embed", "applet", "video", "audio",
    "source", "track", "picture", "canvas", "dialog", "template", "slot",
    "noscript", "meta", "link", "base",
  ],
  // id/name could shadow the page's own elements; background/poster/srcset/ping
  // are ways to make the browser fetch a URL without an <img>.
  FORBID_ATTR: [
    "style", "id", "name", "background", "poster", "srcset", "ping", "download",
    "formaction", "form", "accesskey", "autofocus", "tabindex", "contenteditable",
  ],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

purify.addHook("uponSanitizeAttribute", (node, data) => {
  // The only classes we let through are marked's language hint on code
  // blocks and our renderer's raw-html wrapper (whose style is only
  // monospace text), so model output cannot borrow the page's own classes
  // to imitate its UI.
  if (data.attrName === "class") {
    data.keepAttr =
      (node.nodeName === "CODE" && /^language-[\w+#.-]{1,40}$/.test(data.attrValue)) ||
      (node.nodeName === "DIV" && data.attrValue === "raw-html");
  }
});

const LINK_REL = "noopener noreferrer nofollow";

/**
 * Make a sanitised fragment safe to show and add the page's affordances.
 * The fragment still belongs to DOMPurify's inert document here, where
 * nothing loads, so replacing <img> now means no request is ever made.
 */
function finish(fragment, { highlight }) {
  const doc = fragment.ownerDocument;
  for (const img of fragment.querySelectorAll("img")) {
    const src = img.getAttribute("src") || "";
    const alt = (img.getAttribute("alt") || "").trim();
    const replacement = doc.createElement(/^https?:\/\//i.test(src) ? "a" : "span");
    replacement.className = "image-link";
    replacement.textContent = alt ? `Image: ${alt}` : src ? `Image: ${src}` : "Image";
    if (replacement.tagName === "A") {
      replacement.href = src;
      replacement.title = src;
    }
    img.replaceWith(replacement);
  }
  for (const a of fragment.querySelectorAll("a[href]")) {
    a.target = "_blank";
    a.rel = LINK_REL;
  }
  for (const table of fragment.querySelectorAll("table")) {
    // Wide tables scroll inside their own box instead of widening the page.
    const wrap = doc.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.append(table);
  }
  for (const code of fragment.querySelectorAll("pre > code")) {
    decorateCodeBlock(doc, code, highlight);
  }
  return fragment;
}

function decorateCodeBlock(doc, code, highlight) {
  const pre = code.parentElement;
  const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
  const lang = match ? match[1].toLowerCase() : "";

  const block = doc.createElement("div");
  block.className = "code-block";
  const head = doc.createElement("div");
  head.className = "code-head";
  const label = doc.createElement("span");
  label.className = "code-lang";
  label.textContent = lang || "text";
  const copy = doc.createElement("button");
  copy.type = "button";
  copy.className = "icon-button copy-code";
  copy.setAttribute("aria-label", "Copy code");
  copy.textContent = "Copy";
  head.append(label, copy);
  pre.replaceWith(block);
  block.append(head, pre);

  if (highlight) {
    const html = highlightCode(code.textContent, lang);
    if (html !== null) {
      code.innerHTML = html; // highlight.js escapes the code; it only adds <span class="hljs-…">
      code.classList.add("hljs");
    }
  }
}

// Highlighting is the expensive part; a finished block is highlighted once and
// the result reused when the same text is rendered again.
const highlightCache = new Map();
const HIGHLIGHT_CACHE_SIZE = 200;
const AUTO_DETECT_LIMIT = 20_000;

function highlightCode(text, lang) {
  const key = `${lang}\u0000${text}`;
  if (highlightCache.has(key)) return highlightCache.get(key);
  let html = null;
  try {
    if (lang && hljs.getLanguage(lang)) {
      html = hljs.highlight(text, { language: lang, ignoreIllegals: true }).value;
    } else if (!lang && text.length <= AUTO_DETECT_LIMIT) {
      const result = hljs.highlightAuto(text);
      if (result.relevance >= 5) html = result.value;
    }
  } catch {
    html = null;
  }
  highlightCache.set(key, html);
  if (highlightCache.size > HIGHLIGHT_CACHE_SIZE) {
    highlightCache.delete(highlightCache.keys().next().value);
  }
  return html;
}

const FENCE_OPEN = /^ {0,3}(`{3,}|~{3,})/;
const FENCE_CLOSE = /^ {0,3}(`{3,}|~{3,})[ \t]*$/;

/** Whether a fenced code token already has its closing fence. */
function fenceClosed(raw) {
  const lines = raw.replace(/\n+$/, "").split("\n");
  const open = FENCE_OPEN.exec(lines[0]);
  if (!open || lines.length < 2) return false;
  const close = FENCE_CLOSE.exec(lines[lines.length - 1]);
  return Boolean(close && close[1][0] === open[1][0] && close[1].length >= open[1].length);
}

/**
 * A view of one growing markdown text inside `container`.
 *
 * Streaming calls update() with the whole text so far many times a second.
 * Re-parsing is cheap; rebuilding the DOM is not, and rebuilding it would
 * also lose the reader's text selection. So the text is split into top-level
 * blocks and only blocks whose source changed are rebuilt: usually just the
 * last one. A block still being written is not highlighted until it is done,
 * and half-finished syntax (an unclosed ``` fence) stays inside its own block.
 */
export class MarkdownView {
  constructor(container) {
    this.container = container;
    this.blocks = []; // {raw, complete, nodes}
  }

  update(text, { final = false } = {}) {
    const tokens = marked.lexer(text || "");
    // A reference definition ([1]: http://…) can arrive after the paragraph
    // that uses it; the final render redoes everything so such links resolve.
    const rebuildAll = final && Object.keys(tokens.links || {}).length > 0;

    let keep = 0;
    if (!rebuildAll) {
      while (
        keep < this.blocks.length &&
        keep < tokens.length &&
        this.blocks[keep].complete &&
        this.blocks[keep].raw === tokens[keep].raw &&
        (keep < tokens.length - 1 || final)
      ) {
        keep += 1;
      }
    }
    for (const block of this.blocks.splice(keep)) {
      for (const node of block.nodes) node.remove();
    }

    const fragment = document.createDocumentFragment();
    for (let i = keep; i < tokens.length; i += 1) {
      const token = tokens[i];
      const isLast = i === tokens.length - 1;
      const complete = final || !isLast || (token.type === "code" && fenceClosed(token.raw));
      const nodes = this.renderBlock(token, complete);
      this.blocks.push({ raw: token.raw, complete, nodes });
      fragment.append(...nodes);
    }
    this.container.append(fragment);
  }

  renderBlock(token, complete) {
    if (token.type === "space" || token.type === "def") return [];
    let html;
    try {
      html = marked.parser([token]);
    } catch {
      html = `<p>${escapeHtml(token.raw)}</p>`;
    }
    const fragment = finish(purify.sanitize(html, PURIFY_CONFIG), { highlight: complete });
    return [...document.adoptNode(fragment).childNodes];
  }
}
