// The toolbar above the conversation: its title, the model picker, and the
// connection and model-server status.

import { config, els, root, state } from "./page.js";

export function setConnection(status) {
  els.connection.dataset.state = status;
  els.connection.textContent =
    status === "connected"
      ? "connected"
      : status === "reconnecting"
        ? "reconnecting…"
        : status === "signed-out"
          ? "signed out"
          : "connecting…";
}

export function setLlm(status) {
  els.llm.hidden = status !== "unavailable";
  root.dataset.llm = status;
}

export function setTitle(title) {
  const shown = title || "New chat";
  els.title.textContent = shown;
  document.title = `${shown} · ${config.siteName}`;
}

function wantedModel() {
  if (state.current) return state.currentModel || state.defaultModel;
  return state.newChatModel || state.defaultModel;
}

export function fillModels() {
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

/** Show what a conversation frame says about the conversation on screen. */
export function applyConversation(conv) {
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
