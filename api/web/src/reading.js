// The reading area (the thread that scrolls between the top bar and the ask box) in a long conversation.
//
// A new question is brought to the top of the area, and its answer is followed as it streams — unless the
// reader scrolls away to read something else, which stops the following and shows "Jump to latest" (the
// following starts again when they jump, or scroll back to the end themselves).
//
// The newest turn is at least as tall as the area (`.turn.current` in style.css), so "the end of the
// thread" puts the new question at the top while its answer is short, and the answer's latest line at
// the bottom once it is longer: following is always "stay at the end". Its growth is seen with a
// ResizeObserver, so nothing else has to say when it changed.

const NEAR = 24; // px from the end that still count as "at the end"

export class ReadingArea {
  /**
   * @param {HTMLElement} thread the scrolling element
   * @param {HTMLElement} jump the "Jump to latest" button (hidden while at the end)
   *
   * Example: `const area = new ReadingArea(thread, jumpButton); thread.append(view.root); area.follow(view.root);`
   */
  constructor(thread, jump) {
    this.thread = thread;
    this.jump = jump;
    this.following = false;
    this.placed = null; // the scrollTop this object last set: its own scroll event is not the reader's
    this.growth = new ResizeObserver(() => {
      if (this.following) this.toEnd();
      this.update();
    });
    thread.addEventListener("scroll", () => this.onScroll(), { passive: true });
    jump.addEventListener("click", () => {
      this.following = true;
      this.toEnd();
    });
  }

  /** Bring `turn` (just added, the last) to the top of the area and follow it as it grows. */
  follow(turn) {
    for (const old of this.thread.querySelectorAll(".turn.current")) old.classList.remove("current");
    this.growth.disconnect();
    turn.classList.add("current");
    this.growth.observe(turn);
    this.following = true;
    this.toEnd();
  }

  /** Show `turn`'s top at the top of the area (an opened conversation's last turn), without following. */
  show(turn) {
    this.growth.disconnect();
    this.following = false;
    const padding = parseFloat(getComputedStyle(this.thread).paddingTop) || 0;
    const offset = turn.getBoundingClientRect().top - this.thread.getBoundingClientRect().top - padding;
    this.scrollTo(this.thread.scrollTop + offset);
  }

  /** Nothing to follow (a new chat). */
  reset() {
    this.growth.disconnect();
    this.following = false;
    this.scrollTo(0);
  }

  toEnd() {
    this.scrollTo(this.thread.scrollHeight - this.thread.clientHeight);
  }

  scrollTo(top) {
    this.thread.scrollTop = top;
    this.placed = this.thread.scrollTop; // as the browser clamped it
    this.update();
  }

  atEnd() {
    return this.thread.scrollHeight - this.thread.clientHeight - this.thread.scrollTop <= NEAR;
  }

  onScroll() {
    if (this.placed !== null && Math.abs(this.thread.scrollTop - this.placed) < 1) return; // our own
    this.placed = null;
    this.following = this.atEnd();
    this.update();
  }

  update() {
    this.jump.hidden = this.atEnd();
  }
}
