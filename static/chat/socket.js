// A WebSocket that keeps itself connected: the chat server may restart or the
// network may drop at any time, and the page should recover without a reload.

const BASE_DELAY_MS = 500;
const MAX_DELAY_MS = 10_000;
// The server ended the sign-in behind the socket (docs/protocol.md, close
// codes): retrying with the same credentials cannot help, so the socket stays
// down until resume() (the page may find its session still good).
const FINAL_CLOSE_CODES = new Set([4001, 4003]);

/** ws: or wss: to the page's own host; wss: whenever the page itself is https. */
function socketUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

/**
 * Events (all CustomEvent):
 *  - "open": a connection is up (detail.reconnected tells whether one was up before)
 *  - "close": it went down (detail.delayMs until the next try, detail.failures in a row;
 *    detail.final when it will not retry by itself, see FINAL_CLOSE_CODES)
 *  - "frame": one parsed JSON object from the server (detail); a message too
 *    big for one frame comes whole, put together from its pieces (see Continuations)
 */
export class ChatSocket extends EventTarget {
  constructor(path, { pingEveryMs = 25_000, pongWithinMs = 10_000 } = {}) {
    super();
    this.url = socketUrl(path);
    this.pingEveryMs = pingEveryMs;
    this.pongWithinMs = pongWithinMs;
    this.ws = null;
    this.failures = 0;
    this.everOpened = false;
    this.retryTimer = null;
    this.pingTimer = null;
    this.lastHeard = 0;
    this.stopped = false;

    // A laptop waking up or a network coming back is a good moment to retry
    // at once instead of waiting out a long backoff.
    window.addEventListener("online", () => this.reconnectNow());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.reconnectNow();
    });
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  start() {
    if (!this.ws) this.connect();
  }

  /** Send one frame; false when there is no open connection (the caller decides whether to queue). */
  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  reconnectNow() {
    if (this.ws || this.stopped) return;
    clearTimeout(this.retryTimer);
    this.failures = 0;
    this.connect();
  }

  connect() {
    clearTimeout(this.retryTimer);
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    let opened = false;
    // Per connection: the pieces of a message cut off by a drop never end.
    const pieces = new Continuations();

    ws.addEventListener("open", () => {
      opened = true;
      const reconnected = this.everOpened;
      this.everOpened = true;
      this.failures = 0;
      this.lastHeard = Date.now();
      this.startPinging();
      this.dispatchEvent(new CustomEvent("open", { detail: { reconnected } }));
    });

    ws.addEventListener("message", (event) => {
      this.lastHeard = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame === "object" && !Array.isArray(frame)) {
        const whole = pieces.take(frame);
        if (whole) this.dispatchEvent(new CustomEvent("frame", { detail: whole }));
      }
    });

    ws.addEventListener("close", (event) => this.lost(ws, opened, event.code));
  }

  /** The connection `ws` is gone (closed, or declared dead by the pinger). */
  lost(ws, opened, code) {
    if (this.ws !== ws) return;
    this.ws = null;
    clearInterval(this.pingTimer);
    if (!opened) this.failures += 1;
    const final = FINAL_CLOSE_CODES.has(code);
    this.stopped = final;
    const delayMs = final ? null : this.scheduleRetry();
    this.dispatchEvent(
      new CustomEvent("close", {
        detail: { code, opened, failures: this.failures, delayMs, final },
      }),
    );
  }

  /** Connect again after a final close code. */
  resume() {
    this.stopped = false;
    this.reconnectNow();
  }

  scheduleRetry() {
    // Exponential backoff with "equal jitter": never zero, and many tabs
    // reconnecting after a server restart do not all arrive at once.
    const ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** Math.min(this.failures, 10));
    const delayMs = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), delayMs);
    return delayMs;
  }

  startPinging() {
    // A half-open TCP connection (sleeping laptop, dropped Wi-Fi) never fires
    // "close" by itself; a ping without an answer is how we notice.
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      if (!this.isOpen) return;
      const quietFor = Date.now() - this.lastHeard;
      if (quietFor >= this.pingEveryMs + this.pongWithinMs) {
        // Do not wait for the closing handshake of a dead connection: it
        // can take minutes. Forget it and reconnect now.
        const dead = this.ws;
        this.lost(dead, true, 4000);
        dead.close(4000, "no pong");
      } else if (quietFor >= this.pingEveryMs) {
        this.send({ type: "ping" });
      }
    }, Math.min(this.pingEveryMs, this.pongWithinMs) / 2);
  }
}

/**
 * A `message` frame with `continues: true` and the `more` frames after it
 * (docs/protocol.md, "Big messages") put back together: the server cuts a
 * message over its 1 MiB frame limit into pieces, and the page should see
 * the one frame that would have been sent without the limit.
 */
export class Continuations {
  constructor() {
    this.open = new Map(); // message id -> {frame, content: [pieces], reasoning: [pieces]}
  }

  /** The frame to handle now: `frame` itself, a whole message, or null while pieces are due. */
  take(frame) {
    if (frame.type === "message" && frame.continues === true && typeof frame.message?.id === "string") {
      const { content = "", reasoning = "" } = frame.message;
      this.open.set(frame.message.id, { frame, content: [content], reasoning: [reasoning] });
      return null;
    }
    if (frame.type !== "more") return frame;
    const entry = this.open.get(frame.message);
    if (!entry) return null; // its message frame came before a reload or reconnect
    if (typeof frame.content === "string") entry.content.push(frame.content);
    if (typeof frame.reasoning === "string") entry.reasoning.push(frame.reasoning);
    if (frame.continues !== false) return null;
    this.open.delete(frame.message);
    // Joined once at the end: appending megabytes piece by piece would copy them each time.
    const text = { content: entry.content.join(""), reasoning: entry.reasoning.join("") };
    const whole = { ...entry.frame, message: { ...entry.frame.message, ...text } };
    delete whole.continues;
    return whole;
  }
}
