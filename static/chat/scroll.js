// Scroll-follow: while the reader is at the bottom of the conversation, a
// growing reply keeps it in view; scrolling up lets go, "Jump to latest" or
// sending a message takes hold again (state.stick).

import { els, state } from "./page.js";

const NEAR_BOTTOM_PX = 48;

let lastScrollTop = 0;

function distanceFromBottom() {
  const s = els.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight;
}

/** Called after each render: stay at the bottom if following, and offer the jump otherwise. */
export function followBottom() {
  if (state.stick) els.scroller.scrollTop = els.scroller.scrollHeight;
  lastScrollTop = els.scroller.scrollTop;
  els.jump.hidden = state.stick || distanceFromBottom() <= NEAR_BOTTOM_PX;
}

/** Put `el` `top` px below the top of the view, where the version it replaced stood;
 *  the bottom is followed again only if that is where it leaves the reader. */
export function placeAt(el, top) {
  const s = els.scroller;
  s.scrollTop += el.getBoundingClientRect().top - s.getBoundingClientRect().top - top;
  lastScrollTop = s.scrollTop;
  state.stick = distanceFromBottom() <= NEAR_BOTTOM_PX;
  els.jump.hidden = state.stick;
}

export function installScroll() {
  els.scroller.addEventListener(
    "scroll",
    () => {
      const top = els.scroller.scrollTop;
      // Only a move upwards lets go of the bottom: content growing under a view
      // that we are about to scroll down again must not count as "scrolled up".
      if (distanceFromBottom() <= NEAR_BOTTOM_PX) state.stick = true;
      else if (top < lastScrollTop - 2) state.stick = false;
      lastScrollTop = top;
      els.jump.hidden = state.stick;
    },
    { passive: true },
  );

  els.jump.addEventListener("click", () => {
    state.stick = true;
    followBottom();
    els.prompt.focus({ preventScroll: true });
  });
}
