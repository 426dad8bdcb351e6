// One question and its answer on the page, built from the stream's events (agent/events.py, api/schemas.py):
// meta → status/query → sources → page… → token… (preamble, citation) → related → answer → done,
// or error. A stored turn (GET /conversations/{id}) is drawn from its structured answer instead.
//
// A search round's line goes from "Searching: q" to one of three ends, told apart by the `sources` event
// that closes the round: "Searched: q" (results), "No results: q" (a backend answered, with nothing) or
// "Search failed (names): q" (every backend failed). A reloaded turn draws the same lines from its record.

import { answerMarkdown, externalLink, renderAnswer } from "./answer.js";
import { errorLabel, knows, label, noteLabel } from "./i18n.js";

const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

const LABELLED_ENDS = new Set(["stopped", "failed"]); // a turn that ended otherwise says nothing beside its buttons
const NO_RESULTS = "no results"; // the reason the search chain gives a backend that answered with nothing
const SEARCH_LINE = { searching: "searching", searched: "searched", empty: "search_empty", failed: "search_failed" };
// Statuses drawn from the query, sources and page events instead (their own lines).
const OWN_LINES = new Set(["searching", "reading", "selected"]);

/** The end state of a search round from the `sources` event that closes it: searched, empty or failed. */
function searchOutcome({ sources, backend = null, failures = [] }) {
  if (sources.length) return { state: "searched" };
  const failed = failures.filter((f) => f.reason !== NO_RESULTS).map((f) => f.backend);
  const answered = backend !== null || failures.some((f) => f.reason === NO_RESULTS);
  return !answered && failed.length ? { state: "failed", backends: failed.join(", ") } : { state: "empty" };
}

export class TurnView {
  /**
   * @param {string} question the user's question
   * @param {object} options `media`: [{kind, name?, url?}] to show with the question; `onFollowUp(q)`,
   *   `onRetry(view)` for the buttons
   *
   * Example: `const view = new TurnView("Who built it?", {onFollowUp: ask}); thread.append(view.root);
   * view.onEvent("token", {text: "Gustave Eiffel [1]"});`
   */
  constructor(question, { media = [], onFollowUp, onRetry } = {}) {
    this.question = question;
    this.messageId = null;
    this.sources = new Map(); // n → Source
    this.citations = new Map(); // n → CitationRef (passage, supported) once the answer is in
    this.text = "";
    this.status = "running";
    this.queries = new Map(); // round → query
    this.marks = new Set();
    this.root = el("article", "turn");
    this.root.setAttribute("aria-busy", "true");
    const q = el("div", "question");
    q.append(el("p", "", question));
    q.querySelector("p").dir = "auto";
    if (media.length) {
      const list = el("div", "question-media");
      for (const item of media) {
        if (item.url && item.kind === "image") {
          const img = el("img", "question-thumb");
          img.src = item.url;
          if (item.name) img.alt = item.name;
          else label(img, "attached_image", {}, "alt");
          list.append(img);
        } else list.append(label(el("span", "media-tag"), item.kind === "image" ? "image" : "audio"));
      }
      q.append(list);
    }
    this.steps = el("ul", "steps");
    this.sourceList = el("ol", "cards");
    this.sourceSection = el("section", "sources");
    label(this.sourceSection, "sources", {}, "aria-label");
    this.sourceSection.append(this.sourceList);
    this.sourceSection.hidden = true;
    this.preamble = el("p", "preamble");
    this.preamble.hidden = true;
    this.answer = el("div", "answer markdown");
    this.answer.dir = "auto";
    this.notes = el("ul", "notes");
    this.error = el("p", "turn-error");
    this.error.setAttribute("role", "alert");
    this.error.hidden = true;
    this.actions = el("div", "actions");
    this.copyButton = label(el("button", "action"), "copy");
    this.copyButton.type = "button";
    this.copyButton.addEventListener("click", () => this.copy());
    this.retryButton = label(el("button", "action"), "retry");
    this.retryButton.type = "button";
    this.retryButton.addEventListener("click", () => onRetry?.(this));
    this.statusLabel = el("span", "turn-status");
    this.actions.append(this.copyButton, this.retryButton, this.statusLabel);
    this.actions.hidden = true;
    this.related = el("section", "related");
    this.related.hidden = true;
    this.onFollowUp = onFollowUp;
    this.root.append(q, this.steps, this.sourceSection, this.preamble, this.answer, this.error, this.notes,
      this.actions, this.related);
    this.step("thinking", "thinking");
  }

  /** Show progress line `key` (a later step with the same key replaces it), worded by `text` (i18n) and `params`. */
  step(key, text, params = {}) {
    let line = this.steps.querySelector(`[data-key="${key}"]`);
    if (!line) {
      line = el("li", "step");
      line.dataset.key = key;
      this.steps.append(line);
    }
    return label(line, text, params);
  }

  /** The line of search round `round`: searching, or how it ended (see `searchOutcome`). */
  searchLine(round, query, outcome = { state: "searching" }) {
    const line = this.step(`query-${round}`, SEARCH_LINE[outcome.state], { query, backends: outcome.backends });
    line.className = `step query ${outcome.state}`;
    return line;
  }

  mark(name) {
    // User Timing marks (bench/web.py reads them): when the first source card / answer text arrived, and
    // the frame that painted it.
    if (this.marks.has(name)) return;
    this.marks.add(name);
    performance.mark(`megrez:${name}-arrived`, { detail: this.messageId });
    requestAnimationFrame(() => performance.mark(`megrez:${name}`, { detail: this.messageId }));
  }

  /** Apply one stream event. */
  onEvent(type, data) {
    switch (type) {
      case "meta":
        this.messageId = data.message_id;
        this.root.dataset.messageId = data.message_id;
        break;
      case "status":
        if (data.code ? OWN_LINES.has(data.code) : data.stage === "searching" || data.stage === "reading") break;
        if (data.code && knows(`status.${data.code}`)) this.step("thinking", `status.${data.code}`, data.params);
        else this.step("thinking", "raw", { text: data.message }); // a service older than status codes
        break;
      case "query":
        this.steps.querySelector('[data-key="thinking"]')?.remove();
        this.queries.set(data.round, data.query);
        this.searchLine(data.round, data.query);
        break;
      case "sources":
        this.addSources(data);
        break;
      case "page":
        this.pageRead(data);
        break;
      case "token":
        this.text += data.text;
        this.steps.querySelector('[data-key="thinking"]')?.remove();
        this.scheduleRender();
        this.mark("first-token");
        break;
      case "preamble":
        // What streamed so far was the model talking before a tool call: not part of the answer.
        this.text = this.text.startsWith(data.text) ? this.text.slice(data.text.length) : "";
        this.preamble.textContent += data.text;
        this.preamble.hidden = !this.preamble.textContent.trim();
        this.scheduleRender();
        break;
      case "citation":
        this.citations.set(data.n, { ...this.citations.get(data.n), ...data });
        this.scheduleRender();
        break;
      case "related":
        this.showRelated(data.questions);
        break;
      case "answer":
        this.finishAnswer(data.answer);
        break;
      case "error":
        this.fail(data);
        break;
      case "done":
        this.finish(data.status);
        break;
    }
  }

  addSources(event) {
    const { round, sources } = event;
    for (const source of sources) {
      if (this.sources.has(source.n)) continue;
      this.sources.set(source.n, source);
      const card = el("li", "card");
      card.dataset.n = String(source.n);
      const link = externalLink(source.url, "card-link");
      const head = el("span", "card-head");
      head.append(el("span", "card-n", String(source.n)), el("span", "card-domain", source.domain));
      link.append(head, el("span", "card-title", source.title || source.url), el("span", "card-snippet", source.snippet));
      card.append(link);
      this.sourceList.append(card);
    }
    this.sourceSection.hidden = this.sources.size === 0;
    if (this.queries.has(round)) this.searchLine(round, this.queries.get(round), searchOutcome(event));
    if (sources.length) {
      this.reading = { round, total: sources.length, read: 0, snippet: 0 };
      this.updateReading();
      this.mark("sources");
    }
  }

  pageRead({ url, source, error }) {
    const card = [...this.sourceList.children].find((c) => this.sources.get(Number(c.dataset.n))?.url === url);
    if (card) {
      card.classList.add(source === "page" ? "read" : "snippet");
      if (source === "page") label(card, "card_read", {}, "title");
      else {
        label(card, "card_snippet_why", { error }, "title");
        label(card.querySelector(".card-head"), "card_snippet", {}, "data-badge");
      }
    }
    if (this.reading) {
      this.reading[source === "page" ? "read" : "snippet"] += 1;
      this.updateReading();
    }
  }

  updateReading() {
    const { round, total, read, snippet } = this.reading;
    const done = read + snippet >= total;
    this.step(`read-${round}`, done ? "read" : "reading", { total, read, snippet }).classList.toggle("done", done);
  }

  sourceOf = (n) => {
    const source = this.sources.get(n);
    const cited = this.citations.get(n);
    if (!source && !cited) return undefined;
    return { ...source, ...cited };
  };

  scheduleRender() {
    if (this.pending) return;
    this.pending = requestAnimationFrame(() => {
      this.pending = null;
      renderAnswer(this.answer, this.text, this.sourceOf);
    });
  }

  finishAnswer(answer, { streamed = true } = {}) {
    for (const source of answer.sources) this.sources.set(source.n, source);
    for (const ref of answer.citations) this.citations.set(ref.n, ref);
    if (streamed && this.text.trim() !== answer.answer.trim()) {
      // The stream lost or repeated a piece (it must not: events are resumed by id). The stored answer wins.
      console.warn(`message ${this.messageId}: the streamed text differs from the stored answer`);
    }
    this.text = answer.answer;
    cancelAnimationFrame(this.pending);
    this.pending = null;
    renderAnswer(this.answer, this.text, this.sourceOf);
    this.notes.replaceChildren(...answer.notes.map((note) => label(el("li"), ...noteLabel(note))));
    if (answer.related?.length) this.showRelated(answer.related);
  }

  showRelated(questions) {
    this.related.replaceChildren(label(el("h3"), "related"));
    const list = el("ul");
    for (const question of questions) {
      const button = el("button", "follow-up", question);
      button.type = "button";
      button.dir = "auto";
      button.addEventListener("click", () => this.onFollowUp?.(question));
      const item = el("li");
      item.append(button);
      list.append(item);
    }
    this.related.append(list);
    this.related.hidden = questions.length === 0;
  }

  /** Show why the turn failed: an error event (worded by its code) or an ApiError (by its status). */
  fail(error) {
    label(this.error, ...errorLabel(error));
    this.error.hidden = false;
  }

  connection(state) {
    this.step("connection", "reconnecting").hidden = state !== "reconnecting";
  }

  finish(status) {
    this.status = status;
    this.root.removeAttribute("aria-busy");
    this.root.dataset.status = status;
    this.steps.querySelector('[data-key="thinking"]')?.remove();
    this.steps.querySelector('[data-key="connection"]')?.remove();
    label(this.statusLabel, LABELLED_ENDS.has(status) ? status : "raw", { text: "" });
    this.actions.hidden = false;
    this.copyButton.hidden = !this.text;
    if (this.pending) {
      cancelAnimationFrame(this.pending);
      this.pending = null;
      renderAnswer(this.answer, this.text, this.sourceOf);
    }
  }

  /** Draw a stored turn (TurnOut of GET /conversations/{id}). */
  showStored(turn) {
    this.messageId = turn.message_id;
    this.root.dataset.messageId = turn.message_id;
    const { answer } = turn;
    this.steps.replaceChildren();
    // The notes tell which searches found nothing, and why ("local: no results; web: unavailable: …"), or
    // crashed; the others found what the sources show.
    const ended = new Map();
    for (const note of answer.notes) {
      if (note.code !== "search_empty") continue;
      const failures = (note.params?.reasons || "").split("; ").filter(Boolean).map((part) => {
        const [backend, ...reason] = part.split(": ");
        return { backend, reason: reason.join(": ") };
      });
      ended.set(note.params?.query, searchOutcome({ sources: [], failures }));
    }
    const crashed = answer.notes.some((n) => n.code === "search_failed");
    answer.queries.forEach((query, i) => {
      const last = i === answer.queries.length - 1;
      this.searchLine(i + 1, query, ended.get(query) ?? { state: crashed && last ? "failed" : "searched" });
    });
    this.addSources({ round: 0, sources: answer.sources });
    this.steps.querySelector('[data-key="read-0"]')?.remove();
    this.finishAnswer(answer, { streamed: false });
    if (turn.error) this.fail(turn.error); // a failed turn keeps what it showed, and says why it failed
    this.finish(turn.status);
  }

  /** The answer as Markdown: text with `[n]`, then its cited sources (answer.js `answerMarkdown`). */
  markdown() {
    return answerMarkdown(this.text, this.sourceOf);
  }

  async copy() {
    const text = this.markdown();
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const area = Object.assign(document.createElement("textarea"), { value: text });
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    label(this.copyButton, "copied");
    setTimeout(() => label(this.copyButton, "copy"), 1500);
  }
}
