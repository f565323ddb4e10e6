// A conversation's settings (model and system prompt), saved through the
// settings endpoint; a new chat takes them with its first message instead.

import { postForm } from "./common.js";
import { FRIENDLY, showNotice } from "./errors.js";
import { conversationUrl, els, state } from "./page.js";
import { upsertConversation } from "./sidebar.js";
import { applyConversation } from "./toolbar.js";

async function saveSettings({ quiet = false } = {}) {
  if (!state.current) {
    setSettingsStatus("Used when you send the first message.");
    return;
  }
  const id = state.current;
  const system = els.system.value;
  const fields = { model: els.model.value };
  // Until the conversation frame has told us the saved prompt, an empty box
  // means "unknown", not "clear it".
  if (state.systemLoaded || state.systemDirty) fields.system = system;
  setSettingsStatus("Saving…");
  try {
    const conv = await postForm(conversationUrl(id, "settings"), fields);
    if (els.system.value === system) state.systemDirty = false;
    if (conv && conv.id) {
      upsertConversation(conv);
      if (conv.id === state.current) applyConversation(conv);
    }
    setSettingsStatus(quiet ? "" : "Saved.");
  } catch (error) {
    setSettingsStatus("");
    showNotice(error.code === "not_found" ? FRIENDLY.not_found : "Could not save the settings. Try again.");
  }
}

export function setSettingsStatus(text) {
  els.settingsStatus.textContent = text;
}

export function installSettings() {
  els.model.addEventListener("change", () => {
    if (state.current) {
      state.currentModel = els.model.value;
      saveSettings({ quiet: true });
    } else {
      state.newChatModel = els.model.value;
    }
  });

  els.system.addEventListener("input", () => {
    state.systemDirty = true;
    setSettingsStatus("");
  });

  els.saveSettings.addEventListener("click", () => saveSettings());
}
