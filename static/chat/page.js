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
  noticeAction: $("#notice-action"),
  noticeDismiss: $("#notice-dismiss"),
  reviewNotice: $("#review-notice"),
  composer: $("#composer"),
  prompt: $("#prompt"),
  send: $("#send"),
  stop: $("#stop"),
  announcer: $("#sr-status"),
  tplConversation: $("#tpl-conversation"),
  tplUser: $("#tpl-user-message"),
  tplAssistant: $("#tpl-assistant-message"),
  tplVersions: $("#tpl-versions"),
  tplEditor: $("#tpl-message-editor"),
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

// The server's limits and URLs have their home in Django; the page only reads them.
const data = root.dataset;
export const config = {
  siteName: data.siteName || "chatsite",
  wsPath: data.wsPath || "/ws/chat/",
  maxContent: Number(data.maxContent),
  maxTitle: Number(data.maxTitle),
  chatUrl: data.urlChat,
  searchUrl: data.urlSearch,
};

// Each URL template is reversed by Django with this placeholder for the conversation's id.
const PLACEHOLDER = "00000000-0000-0000-0000-000000000000";
const URL_TEMPLATES = {
  conversation: data.urlConversation,
  rename: data.urlRename,
  delete: data.urlDelete,
  settings: data.urlSettings,
  export_markdown: data.urlExportMarkdown,
  export_json: data.urlExportJson,
};

/** The URL of one of a conversation's pages or endpoints: a key of URL_TEMPLATES. */
export const conversationUrl = (id, kind = "conversation") => URL_TEMPLATES[kind].replace(PLACEHOLDER, id);

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
const [pathBefore, pathAfter] = URL_TEMPLATES.conversation.split(PLACEHOLDER);
// Matched with or without the trailing slash, which a typed address may lack.
const CONVERSATION_PATH = new RegExp(
  `^${escapeRegExp(pathBefore)}([0-9a-fA-F-]{32,36})${escapeRegExp(pathAfter.replace(/\/$/, ""))}/?$`,
);

/** The conversation a path of ours shows; null for the new-chat page or any other path. */
export function idFromPath(path) {
  const match = CONVERSATION_PATH.exec(path);
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
  deleting: new Set(), // conversations this tab is deleting: it leaves them itself, without a notice
};
