// The conversation history: the list (title and date, filtered as the reader types, renamed and deleted in
// place) and, at phone width, the panel it lives in.
//
// At phone width the panel slides over the page as a modal: it closes on a tap outside it, Escape, its
// close button, New chat and on picking a conversation; while it is open the rest of the page is inert and
// Tab cycles inside it, and focus goes back to the button that opened it. At desktop width it is simply
// the left column.

import { call, getJSON } from "./api.js";
import { errorLabel, fullDate, label, shortDate, t } from "./i18n.js";

const PHONE = window.matchMedia("(max-width: 760px)");
const FOCUSABLE = "a[href], button:not([disabled]), input:not([disabled]), select:not([disabled])";
const JSON_BODY = { "Content-Type": "application/json" };
const errorText = (error) => t(...errorLabel(error));

export class Sidebar {
  /**
   * @param {object} ui the elements: `sidebar`, `toggle` (opens it at phone width), `close`, `scrim` (the
   *   dimmed page beside it), `inert` (what it covers), `list`, `empty` (the empty-list line), `filter`
   * @param {object} hooks `keyed(fn)` runs an API call, asking for a key if needed; `current()` the open
   *   conversation's id; `onDeleted(conversation)`; `note(key, params)` tells the reader something
   *
   * Example: `const sidebar = new Sidebar(ui, hooks); await sidebar.load(); sidebar.open();`
   */
  constructor(ui, hooks) {
    this.ui = ui;
    this.hooks = hooks;
    this.conversations = [];
    this.isOpen = false;
    this.renaming = false; // a title being edited: a redraw (a turn ending, say) would throw the edit away
    ui.toggle.addEventListener("click", () => (this.isOpen ? this.close() : this.open()));
    ui.close.addEventListener("click", () => this.close());
    ui.scrim.addEventListener("click", () => this.close());
    ui.filter.addEventListener("input", () => this.draw());
    ui.list.addEventListener("click", (event) => {
      if (event.target.closest(".history-open")) this.close({ refocus: false });
    });
    document.addEventListener("keydown", (event) => this.onKey(event));
    PHONE.addEventListener("change", () => this.close({ refocus: false }));
  }

  open() {
    if (!PHONE.matches) return;
    this.isOpen = true;
    this.ui.sidebar.classList.add("open");
    this.ui.sidebar.setAttribute("role", "dialog");
    this.ui.sidebar.setAttribute("aria-modal", "true");
    this.ui.toggle.setAttribute("aria-expanded", "true");
    this.ui.scrim.hidden = false;
    for (const node of this.ui.inert) node.inert = true;
    this.ui.close.focus();
  }

  /** Close the panel (at phone width); `refocus`: give focus back to the button that opened it. */
  close({ refocus = true } = {}) {
    if (!this.isOpen) return;
    this.isOpen = false;
    this.ui.sidebar.classList.remove("open");
    this.ui.sidebar.removeAttribute("role");
    this.ui.sidebar.removeAttribute("aria-modal");
    this.ui.toggle.setAttribute("aria-expanded", "false");
    this.ui.scrim.hidden = true;
    for (const node of this.ui.inert) node.inert = false;
    if (refocus) this.ui.toggle.focus();
  }

  focusable() {
    return [...this.ui.sidebar.querySelectorAll(FOCUSABLE)].filter((node) => node.getClientRects().length);
  }

  onKey(event) {
    if (!this.isOpen) return;
    if (event.key === "Escape") {
      event.preventDefault();
      this.close();
    } else if (event.key === "Tab") {
      const items = this.focusable();
      const [first, last] = [items[0], items.at(-1)];
      const inside = this.ui.sidebar.contains(document.activeElement);
      if (!inside || document.activeElement === (event.shiftKey ? first : last)) {
        event.preventDefault();
        (event.shiftKey ? last : first)?.focus();
      }
    }
  }

  /** Fetch the list again and draw it. */
  async load() {
    try {
      this.conversations = await this.hooks.keyed(() => getJSON("/conversations?limit=200"));
    } catch (error) {
      label(this.ui.empty, "history_unavailable", { error: errorText(error) });
      this.ui.empty.hidden = false;
      return;
    }
    this.draw();
  }

  /** Draw the list as filtered (also after a change of language: the dates are worded in it). */
  draw() {
    if (this.renaming) return;
    const wanted = this.ui.filter.value.trim().toLocaleLowerCase();
    const shown = this.conversations.filter((c) => !wanted || (c.title || "").toLocaleLowerCase().includes(wanted));
    this.ui.list.replaceChildren(...shown.map((c) => this.item(c)));
    label(this.ui.empty, this.conversations.length ? "history_no_match" : "history_none");
    this.ui.empty.hidden = shown.length > 0;
  }

  item(c) {
    const item = document.createElement("li");
    item.dataset.id = c.id;
    const open = document.createElement("a");
    open.className = "history-open";
    open.href = `#/c/${encodeURIComponent(c.id)}`;
    if (c.id === this.hooks.current()) open.setAttribute("aria-current", "page");
    const title = document.createElement("span");
    title.className = "history-title";
    title.dir = "auto";
    if (c.title) title.textContent = c.title;
    else label(title, "untitled");
    const date = document.createElement("time");
    date.className = "history-date";
    date.dateTime = new Date(c.updated * 1000).toISOString();
    date.textContent = shortDate(c.updated);
    date.title = fullDate(c.updated);
    open.append(title, date);
    const rename = button("history-rename", '<path d="M4 20h4L19 9l-4-4L4 16v4zM14 6l4 4"/>');
    label(rename, "rename", { title: c.title }, "aria-label");
    rename.addEventListener("click", () => this.rename(item, c));
    const remove = button("history-delete", '<path d="M6 6l12 12M18 6 6 18"/>');
    label(remove, "delete", { title: c.title }, "aria-label");
    remove.addEventListener("click", () => this.remove(c));
    item.append(open, rename, remove);
    return item;
  }

  /** Edit `c`'s title in place: Enter or leaving the field saves, Escape keeps the old one. */
  rename(item, c) {
    const link = item.querySelector(".history-open");
    const input = document.createElement("input");
    input.className = "history-title-input";
    input.value = c.title;
    input.maxLength = 200;
    input.dir = "auto";
    label(input, "rename_input", { title: c.title }, "aria-label");
    link.replaceWith(input);
    input.focus();
    input.select();
    this.renaming = true;
    let ended = false;
    // `refocus`: the reader pressed Enter or Escape (a blur means they went elsewhere: leave focus there).
    const end = async (save, refocus) => {
      if (ended) return;
      ended = true;
      this.renaming = false;
      const title = input.value.replace(/\s+/g, " ").trim();
      if (save && title && title !== c.title) {
        try {
          const path = `/conversations/${encodeURIComponent(c.id)}`;
          const request = { method: "PATCH", body: JSON.stringify({ title }), headers: JSON_BODY };
          await this.hooks.keyed(() => call(path, request));
        } catch (error) {
          this.hooks.note("rename_failed", { error: errorText(error) });
        }
        await this.load();
      } else this.draw();
      if (refocus) this.ui.list.querySelector(`[data-id="${CSS.escape(c.id)}"] .history-rename`)?.focus();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        end(true, true);
      } else if (event.key === "Escape") {
        event.stopPropagation(); // cancels the rename, not the panel
        end(false, true);
      }
    });
    input.addEventListener("blur", () => end(true, false));
  }

  async remove(c) {
    if (!window.confirm(t("delete_confirm", { title: c.title }))) return;
    try {
      await this.hooks.keyed(() => call(`/conversations/${encodeURIComponent(c.id)}`, { method: "DELETE" }));
    } catch (error) {
      if (error.status !== 404) return this.hooks.note("delete_failed", { error: errorText(error) });
    }
    this.hooks.onDeleted(c);
    this.load();
  }
}

function button(className, path) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = `icon-button ${className}`;
  node.innerHTML = `<svg aria-hidden="true" viewBox="0 0 24 24">${path}</svg>`; // constant markup, no data
  return node;
}
