// What every part of the chat page shares: its elements, the settings the
// server rendered onto #chat, and the state mirrored from the server's frames.

export const $ = (selector, root = document) => root.querySelector(selector);

export const root = $("#chat");

export const els = {
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
export const replyActions = {
  regenerate: $("#tpl-reply-actions").content.querySelector(".regenerate").cloneNode(true),
  retry: $("#tpl-reply-actions").content.querySelector(".retry").cloneNode(true),
};

export const LIVE = new Set(["pending", "streaming"]);
export const FAILED = new Set(["error", "interrupted"]);

const data = root.dataset;
export const config = {
  siteName: data.siteName || "chatsite",
  wsPath: data.wsPath || "/ws/chat/",
  maxContent: 32_000,
  maxTitle: 200,
  chatUrl: "/",
};

/** The URL of one of a conversation's pages or endpoints: "conversation", "rename", "delete" or "settings". */
export const conversationUrl = (id, kind = "conversation") => (kind === "conversation" ? `/c/${id}/` : `/c/${id}/${kind}/`);

/** The conversation a path of ours shows; null for the new-chat page or any other path. */
export function idFromPath(path) {
  const match = /\/c\/([0-9a-fA-F-]{32,36})\/?$/.exec(path);
  return match ? match[1] : null;
}

export const state = {
  current: data.conversation || null,
  currentModel: data.conversationModel || "",
  defaultModel: data.defaultModel || "",
  newChatModel: "",
  models: [],
  messages: new Map(), // message id -> Msg
  replay: null, // {marker, stale:Set} while a subscribe's snapshots arrive
  systemDirty: false,
  systemLoaded: true, // the template filled #system for the conversation it rendered
  stick: true, // follow the bottom of the conversation
  wasBusy: false,
  probedLogin: false,
};
