// The page: the ask box, the thread of answers, the service's state, the API key, and how they meet.
//
// State is small and lives here: the open conversation (also in the URL, #/c/<id>, so a reload or a
// shared link reopens it), the turn being answered, and the service's /info. A turn that is still
// running when the page reloads is remembered in sessionStorage and followed again from its start.
// `/?q=…&mode=…` asks a question on arrival (what the OpenSearch description, /opensearch.xml, sends),
// once the engine is ready; until then the ask box is disabled and says why (/info's `engine`, `setup`).

import { ApiError, call, follow, getJSON, saveKey, storedKey } from "./api.js";
import { citationPopover } from "./answer.js";
import { errorLabel, knows, label, lang, relabel, setLanguage, t } from "./i18n.js";
import { Attachments, appendMedia } from "./media.js";
import { ReadingArea } from "./reading.js";
import { Sidebar } from "./sidebar.js";
import { TurnView } from "./turn.js";

const $ = (id) => document.getElementById(id);
const ui = {
  thread: $("thread"), welcome: $("welcome"), examples: $("examples"), question: $("question"),
  composer: $("composer"), mode: $("mode"), send: $("send"), stop: $("stop"), note: $("composer-note"),
  state: $("service-state"), engineNote: $("engine-note"), exportButton: $("export"), lang: $("lang"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
};
const PENDING = "megrez.pending"; // {conversationId, messageId, question} of a turn still running
const MODES = ["auto", "always", "off"];
const app = { info: null, conversationId: null, running: null, views: new WeakMap() };
app.ready = new Promise((resolve) => (app.markReady = resolve));
const errorText = (error) => t(...errorLabel(error));
const media = new Attachments($("attachments"), note);
const reading = new ReadingArea(ui.thread, $("jump"));
const sidebar = new Sidebar(
  {
    sidebar: $("sidebar"), toggle: $("toggle-sidebar"), close: $("close-sidebar"), scrim: $("scrim"),
    inert: [document.querySelector(".main"), document.querySelector(".skip")],
    list: $("history"), empty: $("history-empty"), filter: $("history-filter"),
  },
  {
    keyed,
    current: () => app.conversationId,
    onDeleted: (c) => c.id === app.conversationId && newChat(),
    note,
  },
);

/** Tell the reader something for a few seconds (an i18n key and its values). */
function note(key, params = {}) {
  label(ui.note, key, params);
  clearTimeout(note.timer);
  if (ui.note.textContent) note.timer = setTimeout(() => label(ui.note, "raw", { text: "" }), 6000);
}

// --- API key --------------------------------------------------------------------------------------

function askKey(rejected) {
  label(ui.keyError, rejected ? "key_rejected" : "raw", { text: "" });
  ui.keyInput.value = "";
  ui.keyDialog.showModal();
  return new Promise((resolve) => {
    ui.keyForm.onsubmit = (event) => {
      event.preventDefault();
      saveKey(ui.keyInput.value.trim());
      ui.keyDialog.close();
      resolve();
    };
  });
}

/** Run `fn`; when the service says the key is missing or wrong, ask for one and run it again. */
async function keyed(fn) {
  for (;;) {
    try {
      return await fn();
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) throw error;
      const rejected = Boolean(storedKey());
      saveKey("");
      await askKey(rejected);
    }
  }
}

// --- service state --------------------------------------------------------------------------------

async function loadInfo() {
  let info;
  try {
    info = await getJSON("/info");
  } catch {
    label(ui.state, "state.unreachable");
    setTimeout(loadInfo, 3000);
    return;
  }
  if (info.keys_required && info.ready === undefined) {
    await askKey(Boolean(storedKey()));
    return loadInfo();
  }
  app.info = info;
  media.accepts = new Set(info.media);
  media.model = info.model;
  media.limits = info.limits;
  for (const [id, kind, name] of [["attach-image", "image", "attach_images"], ["record", "audio", "record"],
    ["attach-audio", "audio", "upload_audio"]]) {
    const why = media.refusal(kind);
    $(id).setAttribute("aria-disabled", String(Boolean(why)));
    const [key, params] = why ?? [name, {}];
    label($(id), key, params, "title");
  }
  showState();
  if (info.ready) app.markReady();
  else setTimeout(loadInfo, 3000);
}

/** The engine's state as a short plain status, and until it is ready the ask box disabled with the reason.
 * The engine's own error (library text, server addresses) is for operators: the log and /readyz. */
function showState() {
  const info = app.info;
  if (!info) return;
  const engine = info.engine ?? (info.ready ? "ready" : "loading");
  const ready = engine === "ready" && info.ready !== false;
  const hints = (info.setup ?? []).filter((h) => knows(`setup.${h.code}`));
  const engineHint = hints.find((h) => h.code.startsWith("engine_"));
  const searchHint = hints.find((h) => h.code === "search_no_backend");
  if (!ready) label(ui.state, engine === "loading" ? "state.loading" : "state.unavailable");
  else label(ui.state, searchHint ? "state.no_search" : "raw", { text: "" });
  const hint = ready ? searchHint : engineHint;
  if (hint) label(ui.engineNote, `setup.${hint.code}`, hint.params ?? {});
  else label(ui.engineNote, ready ? "raw" : `reason.${engine === "loading" ? "loading" : "unavailable"}`, { text: "" });
  ui.engineNote.hidden = !ui.engineNote.textContent;
  ui.question.disabled = ui.send.disabled = !ready;
  ui.composer.classList.toggle("unready", !ready);
  for (const example of ui.examples.querySelectorAll("button")) example.disabled = !ready;
}

// --- conversations --------------------------------------------------------------------------------

function newChat() {
  if (app.running) return note("stop_first");
  sidebar.close({ refocus: false });
  app.conversationId = null;
  history.replaceState(null, "", location.pathname);
  ui.thread.replaceChildren(ui.welcome);
  ui.welcome.hidden = false;
  ui.exportButton.hidden = true;
  reading.reset();
  sidebar.load();
  ui.question.focus();
}

async function openConversation(id) {
  if (app.running) return;
  let conversation;
  try {
    conversation = await keyed(() => getJSON(`/conversations/${encodeURIComponent(id)}`));
  } catch (error) {
    note(error.status === 404 ? "gone" : "open_failed", { error: errorText(error) });
    return newChat();
  }
  app.conversationId = id;
  ui.thread.replaceChildren(ui.welcome);
  // A stopped or failed turn asked again right after was replaced by that retry: show the retry only.
  const turns = conversation.turns.filter(
    (turn, i, all) => turn.status === "done" || all[i + 1]?.question !== turn.question,
  );
  let view;
  for (const turn of turns) {
    view = addView(turn.question, { shown: turn.media.map((m) => ({ kind: m.kind })), follow: false });
    view.showStored(turn);
  }
  if (view) reading.show(view.root);
  sidebar.load();
  const pending = JSON.parse(sessionStorage.getItem(PENDING) || "null");
  if (pending?.conversationId === id && !conversation.turns.some((t) => t.message_id === pending.messageId)) {
    run(addView(pending.question), { messageId: pending.messageId }); // still running: follow it again
  }
}

function route() {
  const match = /^#\/c\/(.+)$/.exec(location.hash);
  return match ? openConversation(decodeURIComponent(match[1])) : undefined;
}

/** The conversation on the page as Markdown: its title, then each question with its answer and sources. */
function exportConversation() {
  const views = [...ui.thread.querySelectorAll(".turn")].map((root) => app.views.get(root)).filter(Boolean);
  if (!views.length) return;
  const line = (s) => s.replace(/\s+/g, " ").trim();
  const title = line(sidebar.conversations.find((c) => c.id === app.conversationId)?.title || views[0].question);
  const parts = [`# ${title}`, ...views.map((v) => `## ${line(v.question)}\n\n${v.markdown().trimEnd()}`)];
  const text = `${parts.join("\n\n")}\n`;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type: "text/markdown;charset=utf-8" }));
  link.download = `${title.replace(/[\\/:*?"<>|\s]+/g, "-").slice(0, 80) || "conversation"}.md`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

// --- asking ---------------------------------------------------------------------------------------

/** A new turn on the page, appended (and followed) or in place of `replace` (a retried turn). */
function addView(question, { shown = [], mode = ui.mode.value, replace = null, follow = true } = {}) {
  const view = new TurnView(question, {
    media: shown,
    onFollowUp: (q) => ask(q),
    onRetry: (v) => {
      const last = v.root === ui.thread.querySelector(".turn:last-of-type");
      const replace = last && (v.status === "stopped" || v.status === "failed") ? v : null;
      ask(v.question, { items: v.items || [], mode: v.mode, replace });
    },
  });
  view.mode = mode;
  app.views.set(view.root, view);
  ui.welcome.hidden = true;
  ui.exportButton.hidden = false;
  if (replace) replace.root.replaceWith(view.root);
  else ui.thread.append(view.root);
  if (follow) reading.follow(view.root);
  return view;
}

async function ask(question, { items = media.take(), mode = ui.mode.value, replace = null } = {}) {
  question = question.trim();
  if (!question || app.running || !app.info?.ready) return;
  if (question.length > app.info.limits.max_message_chars) {
    return note("too_long", { max: app.info.limits.max_message_chars });
  }
  const shown = items.map((i) => ({ kind: i.kind, url: i.url, name: i.name }));
  const view = addView(question, { shown, mode, replace });
  view.items = items;
  performance.mark("megrez:ask");
  const form = new FormData();
  form.append("message", question);
  if (app.conversationId) form.append("conversation_id", app.conversationId);
  appendMedia(form, items);
  const start = () =>
    call(`/chat?websearch=${encodeURIComponent(mode)}&stream=true`, {
      method: "POST",
      body: form,
      headers: { Accept: "text/event-stream" },
      signal: app.running?.abort.signal,
    });
  await run(view, { start });
}

/** Follow `view`'s turn: started with `start()` (a new question) or picked up by `messageId`. */
async function run(view, { start, messageId }) {
  app.running = { view, abort: new AbortController() };
  setBusy(true);
  try {
    const response = start ? await keyed(start) : undefined;
    const status = await follow(
      { response, messageId },
      {
        signal: app.running.abort.signal,
        onConnection: (state) => view.connection(state),
        onEvent: (type, data) => {
          if (type === "meta") {
            app.conversationId = data.conversation_id;
            history.replaceState(null, "", `${location.pathname}#/c/${encodeURIComponent(data.conversation_id)}`);
            const { conversation_id: conversationId, message_id: messageId } = data;
            sessionStorage.setItem(PENDING, JSON.stringify({ conversationId, messageId, question: view.question }));
            sidebar.load();
          }
          view.onEvent(type, data);
        },
      },
    );
    if (status !== "running") sessionStorage.removeItem(PENDING);
  } catch (error) {
    if (error.name !== "AbortError") view.fail(error);
    view.finish("failed");
    if (error.status !== 0) sessionStorage.removeItem(PENDING);
  } finally {
    app.running = null;
    setBusy(false);
    sidebar.load();
  }
}

async function stop() {
  const running = app.running;
  if (!running) return;
  if (!running.view.messageId) return running.abort.abort(); // not started on the service yet
  ui.stop.disabled = true;
  try {
    await keyed(() => call(`/chat/${encodeURIComponent(running.view.messageId)}/stop`, { method: "POST" }));
  } catch (error) {
    note("stop_failed", { error: errorText(error) });
  } finally {
    ui.stop.disabled = false;
  }
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.composer.classList.toggle("busy", busy);
}

// --- composer -------------------------------------------------------------------------------------

function growQuestion() {
  ui.question.style.height = "auto";
  ui.question.style.height = `${Math.min(ui.question.scrollHeight, 240)}px`;
}

function wireComposer() {
  ui.mode.addEventListener("change", () => localStorage.setItem("megrez.mode", ui.mode.value));
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const question = ui.question.value;
    if (!question.trim() || app.running || !app.info?.ready) return;
    ui.question.value = "";
    growQuestion();
    ask(question);
  });
  ui.question.addEventListener("input", growQuestion);
  ui.question.addEventListener("keydown", (event) => {
    // An IME (Chinese, Japanese…) uses Enter to accept its candidate: that must not send the question.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    ui.composer.requestSubmit();
  });
  ui.stop.addEventListener("click", stop);
  media.wire({
    composer: ui.composer, question: ui.question, record: $("record"),
    image: [$("attach-image"), $("image-input")], audio: [$("attach-audio"), $("audio-input")],
  });
}

function drawExamples() {
  ui.examples.replaceChildren(
    ...t("examples_list").map((question) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "example";
      button.dir = "auto";
      button.textContent = question;
      button.disabled = ui.question.disabled;
      button.addEventListener("click", () => ask(question, { items: [] }));
      const item = document.createElement("li");
      item.append(button);
      return item;
    }),
  );
}

function wirePage() {
  $("new-chat").addEventListener("click", newChat);
  ui.exportButton.addEventListener("click", exportConversation);
  window.addEventListener("hashchange", route);
  ui.lang.value = lang();
  ui.lang.addEventListener("change", () => {
    setLanguage(ui.lang.value);
    drawExamples();
    sidebar.draw();
    showState();
  });
  citationPopover(
    $("popover"),
    (chip) => {
      const view = app.views.get(chip.closest(".turn"));
      const n = Number(chip.dataset.n);
      const info = view?.sourceOf(n);
      return info && { ...info, n };
    },
    () => ({ top: ui.thread.getBoundingClientRect().top, bottom: ui.composer.getBoundingClientRect().top }),
  );
}

// `/?q=…&mode=…`: asked once on arrival, then taken out of the URL so a reload does not ask it again.
const arrival = new URLSearchParams(location.search);
const arriving = arrival.get("q")?.trim();
const arrivingMode = MODES.includes(arrival.get("mode")) ? arrival.get("mode") : null;
if (arrival.has("q") || arrival.has("mode")) history.replaceState(null, "", location.pathname + location.hash);

relabel();
drawExamples();
wireComposer();
wirePage();
await loadInfo();
ui.mode.value = arrivingMode || localStorage.getItem("megrez.mode") || app.info?.default_mode || "auto";
await route();
sidebar.load();
if (arriving) {
  ui.question.value = arriving; // shown while the engine gets ready
  await app.ready;
  ui.question.value = "";
  ask(arriving, { items: [] });
} else ui.question.focus();
