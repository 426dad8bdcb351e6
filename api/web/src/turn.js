// One question and its answer on the page, built from the stream's events (agent/events.py, api/schemas.py):
// meta → status/query → sources → page… → token… (preamble, citation) → related → answer → done,
// or error. A stored turn (GET /conversations/{id}) is drawn from its structured answer instead.

import { externalLink, renderAnswer } from "./answer.js";

const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

const STATUS_LABEL = { done: "", stopped: "Stopped", failed: "Failed" };

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
          img.alt = item.name || "attached image";
          list.append(img);
        } else list.append(el("span", "media-tag", item.kind === "image" ? "image" : "audio"));
      }
      q.append(list);
    }
    this.steps = el("ul", "steps");
    this.sourceList = el("ol", "cards");
    this.sourceSection = el("section", "sources");
    this.sourceSection.setAttribute("aria-label", "Sources");
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
    this.copyButton = el("button", "action", "Copy");
    this.copyButton.type = "button";
    this.copyButton.addEventListener("click", () => this.copy());
    this.retryButton = el("button", "action", "Retry");
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
    this.step("Thinking…", "thinking");
  }

  /** Show a progress line; `key` names a line that later updates replace. */
  step(text, key) {
    let line = key && this.steps.querySelector(`[data-key="${key}"]`);
    if (!line) {
      line = el("li", "step");
      if (key) line.dataset.key = key;
      this.steps.append(line);
    }
    line.textContent = text;
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
        if (data.stage !== "searching" && data.stage !== "reading") this.step(data.message, "thinking");
        break;
      case "query":
        this.steps.querySelector('[data-key="thinking"]')?.remove();
        this.step(`Searching: ${data.query}`, `query-${data.round}`).classList.add("query");
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
        this.fail(data.message);
        break;
      case "done":
        this.finish(data.status);
        break;
    }
  }

  addSources({ round, sources, failures = [] }) {
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
    const failed = failures.length ? ` (${failures.map((f) => f.backend).join(", ")} failed)` : "";
    if (!sources.length) this.step(`No results${failed}`, `read-${round}`);
    else {
      this.reading = { round, total: sources.length, read: 0, snippet: 0 };
      this.updateReading();
      this.mark("sources");
    }
  }

  pageRead({ url, source, error }) {
    const card = [...this.sourceList.children].find((c) => this.sources.get(Number(c.dataset.n))?.url === url);
    if (card) {
      card.classList.add(source === "page" ? "read" : "snippet");
      card.title = source === "page" ? "Read" : `Used the snippet: ${error || "the page could not be read"}`;
    }
    if (this.reading) {
      this.reading[source === "page" ? "read" : "snippet"] += 1;
      this.updateReading();
    }
  }

  updateReading() {
    const { round, total, read, snippet } = this.reading;
    const done = read + snippet;
    const parts = [`${read} read`];
    if (snippet) parts.push(`${snippet} from snippets`);
    const text = done < total ? `Reading ${total} pages: ${parts.join(", ")}` : `Read ${total} pages: ${parts.join(", ")}`;
    this.step(text, `read-${round}`).classList.toggle("done", done >= total);
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
    this.notes.replaceChildren(...answer.notes.map((note) => el("li", "", note)));
    if (answer.related?.length) this.showRelated(answer.related);
  }

  showRelated(questions) {
    this.related.replaceChildren(el("h3", "", "Related"));
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

  fail(message) {
    this.error.textContent = message;
    this.error.hidden = false;
  }

  connection(state) {
    this.step(state === "reconnecting" ? "Connection lost, reconnecting…" : "", "connection").hidden =
      state !== "reconnecting";
  }

  finish(status) {
    this.status = status;
    this.root.removeAttribute("aria-busy");
    this.root.dataset.status = status;
    this.steps.querySelector('[data-key="thinking"]')?.remove();
    this.steps.querySelector('[data-key="connection"]')?.remove();
    this.statusLabel.textContent = STATUS_LABEL[status] ?? status;
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
    for (const query of answer.queries) this.step(`Searched: ${query}`).classList.add("query");
    this.addSources({ round: 1, sources: answer.sources });
    this.steps.querySelector('[data-key="read-1"]')?.remove();
    this.finishAnswer(answer, { streamed: false });
    if (turn.error) this.fail(turn.error.message); // a failed turn keeps what it showed, and says why it failed
    this.finish(turn.status);
  }

  async copy() {
    const text = this.answer.innerText;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const area = Object.assign(document.createElement("textarea"), { value: text });
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    this.copyButton.textContent = "Copied";
    setTimeout(() => (this.copyButton.textContent = "Copy"), 1500);
  }
}
