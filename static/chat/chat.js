// The chat page: sidebar, conversation view and composer, driven by the
// WebSocket protocol v1 (docs/protocol.md). Each part of the page has a module
// of its own; this one only wires them together and starts the socket.
//
// The modules import each other's functions but run nothing when loaded
// (page.js and requests.js only build objects): every listener is installed
// from here, once all of them are evaluated.

import { refreshRelativeTimes } from "./common.js";
import { autoGrow, giveBack, installComposer, regenerate, updateComposer } from "./composer.js";
import { installNotices, probeLogin, showNotice } from "./errors.js";
import { installMessages, updateEmptyState } from "./messages.js";
import { els, root, state } from "./page.js";
import { pending, socket } from "./requests.js";
import { installScroll } from "./scroll.js";
import { installSearch, revealFromAddress } from "./search.js";
import { installSettings } from "./settings.js";
import { installSidebar, markActive, updateSidebarEmpty } from "./sidebar.js";
import { handleFrame, openConversation, showSavedMessages, subscribe } from "./stream.js";
import { fillModels, setConnection, setTitle } from "./toolbar.js";
import { installVersions } from "./versions.js";

socket.addEventListener("open", () => {
  setConnection("connected");
  state.probedLogin = false;
  if (state.current) subscribe(state.current);
  for (const [id, entry] of pending) {
    // A new conversation we never heard back about cannot be replayed; give
    // the text back rather than guess whether the server got it.
    if (entry.type === "send" && entry.lost && !entry.conversation) giveBack(id, entry);
  }
  pending.flushOutbox();
});

socket.addEventListener("close", (event) => {
  setConnection("reconnecting");
  pending.connectionLost();
  state.replay = null;
  updateComposer();
  const { code, failures } = event.detail;
  if (code === 4003) {
    // Signed out (logout, a new password, deactivation). The browser's own
    // session may have survived, as when this browser changed the password.
    setConnection("signed-out");
    probeLogin("You were signed out.").then((signedIn) => {
      if (signedIn !== false) socket.resume();
    });
  } else if (failures >= 3 && !state.probedLogin) probeLogin();
});

socket.addEventListener("frame", (event) => handleFrame(event.detail));

installNotices();
installScroll();
installMessages({ regenerate });
installVersions();
installComposer();
installSettings();
installSidebar({ open: openConversation });
installSearch({ open: openConversation });

// A request the server never answers must not leave the composer locked.
setInterval(() => {
  if (pending.expire()) {
    updateComposer();
    showNotice("The server did not answer. Try again.");
  }
}, 5_000);

history.replaceState({ conversation: state.current }, "", location.href);
setTitle(state.current ? root.dataset.conversationTitle : "");
setConnection("connecting");
fillModels();
showSavedMessages();
markActive();
updateSidebarEmpty();
updateEmptyState();
updateComposer();
refreshRelativeTimes(els.list);
autoGrow();
els.prompt.focus();
revealFromAddress();
socket.start();
