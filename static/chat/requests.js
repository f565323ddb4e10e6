// The requests this page has sent and not yet seen answered, and the frames
// written while offline. Answers are matched to requests by their `id`
// (docs/protocol.md); a request the server never answers must not leave the
// page waiting forever.

import { ChatSocket } from "./socket.js";
import { config } from "./page.js";

const START_TIMEOUT_MS = 60_000;

let requestCounter = 0;
// crypto.randomUUID needs a secure context; a LAN install is often plain http.
export const requestId = (kind) =>
  `${kind}-${Date.now().toString(36)}-${(requestCounter += 1)}-${Math.random().toString(36).slice(2, 8)}`;

const startsReply = (entry) => entry.type === "send" || entry.type === "regenerate" || entry.type === "edit";

class PendingRequests {
  constructor(socket) {
    this.socket = socket;
    this.entries = new Map(); // request id -> what we asked for, until answered
    this.outbox = []; // frames written while offline
  }

  [Symbol.iterator]() {
    return this.entries[Symbol.iterator]();
  }

  values() {
    return this.entries.values();
  }

  get(id) {
    return id ? this.entries.get(id) : undefined;
  }

  set(id, entry) {
    this.entries.set(id, entry);
  }

  delete(id) {
    this.entries.delete(id);
  }

  /** Remember a new request of `kind`; returns the id its frame must carry. */
  add(kind, entry) {
    const id = requestId(kind);
    this.entries.set(id, entry);
    return id;
  }

  /** Send a frame now, or queue it until the socket is back; true when it went out. */
  transmit(frame) {
    const entry = this.get(frame.id);
    if (this.socket.send(frame)) {
      if (entry) {
        entry.sent = true;
        entry.sentAt = Date.now();
      }
      return true;
    }
    this.outbox.push(frame);
    return false;
  }

  flushOutbox() {
    for (const frame of this.outbox.splice(0)) this.transmit(frame);
  }

  /** Take back a send still queued for `conversation`: {id, entry}, or null when none is. */
  unqueueSend(conversation) {
    const index = this.outbox.findIndex((f) => f.type === "send" && (f.conversation || null) === conversation);
    if (index < 0) return null;
    const [frame] = this.outbox.splice(index, 1);
    return { id: frame.id, entry: this.entries.get(frame.id) };
  }

  /** The socket dropped: answers to what it carried will never come. */
  connectionLost() {
    for (const [id, entry] of this.entries) {
      if (!entry.sent) continue;
      if (entry.type === "send" && !entry.confirmed) {
        // Kept, to be given back or confirmed by the replay after reconnecting.
        entry.lost = true;
        entry.awaitingStart = false;
      } else {
        this.entries.delete(id);
      }
    }
  }

  /** Whether a send, regenerate or edit in `conversation` still waits for its reply to start. */
  waitingForStart(conversation) {
    for (const entry of this.entries.values()) {
      if (startsReply(entry) && entry.awaitingStart && (entry.conversation || null) === conversation) return true;
    }
    return false;
  }

  /** A reply in `conversation` started: what asked for it waits no longer. */
  replyStarted(conversation) {
    for (const [id, entry] of this.entries) {
      if (startsReply(entry) && entry.conversation === conversation) {
        entry.awaitingStart = false;
        // A send's entry stays until its bubble is confirmed (adoptUserBubble).
        if (entry.type !== "send" || entry.confirmed) this.entries.delete(id);
      }
    }
  }

  /** Stop waiting for starts the server never sent; true when any request gave up. */
  expire(now = Date.now()) {
    let changed = false;
    for (const [id, entry] of this.entries) {
      if (entry.awaitingStart && entry.sent && now - entry.sentAt > START_TIMEOUT_MS) {
        entry.awaitingStart = false;
        if (!entry.bubble || entry.confirmed) this.entries.delete(id);
        changed = true;
      }
    }
    return changed;
  }
}

export const socket = new ChatSocket(config.wsPath);
export const pending = new PendingRequests(socket);
