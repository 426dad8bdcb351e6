// The page: the ask box, the thread of answers, the conversation history, the API key.
//
// State is small and lives here: the open conversation (also in the URL, #/c/<id>, so a reload or a
// shared link reopens it), the turn being answered, and the service's /info. A turn that is still
// running when the page reloads is remembered in sessionStorage and followed again from its start.

import { ApiError, call, follow, getJSON, saveKey, storedKey } from "./api.js";
import { citationPopover } from "./answer.js";
import { Attachments, appendMedia, Recorder } from "./media.js";
import { TurnView } from "./turn.js";

const $ = (id) => document.getElementById(id);
const ui = {
  thread: $("thread"), welcome: $("welcome"), question: $("question"), composer: $("composer"),
  mode: $("mode"), send: $("send"), stop: $("stop"), note: $("composer-note"), history: $("history"),
  historyEmpty: $("history-empty"), sidebar: $("sidebar"), toggle: $("toggle-sidebar"), state: $("service-state"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
};
const PENDING = "megrez.pending"; // {conversationId, messageId, question} of a turn still running
const app = { info: null, conversationId: null, running: null, views: new WeakMap() };
const media = new Attachments($("attachments"), note);

function note(message) {
  ui.note.textContent = message;
  clearTimeout(note.timer);
  if (message) note.timer = setTimeout(() => (ui.note.textContent = ""), 6000);
}

// --- API key --------------------------------------------------------------------------------------

function askKey(message = "") {
  ui.keyError.textContent = message;
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
      saveKey("");
      await askKey(storedKey() ? "That key was not accepted." : error.message);
    }
  }
}

// --- service state --------------------------------------------------------------------------------

async function loadInfo() {
  let info;
  try {
    info = await getJSON("/info");
  } catch (error) {
    ui.state.textContent = `Service unreachable: ${error.message}`;
    setTimeout(loadInfo, 3000);
    return;
  }
  if (info.keys_required && info.ready === undefined) {
    await askKey(storedKey() ? "That key was not accepted." : "");
    return loadInfo();
  }
  app.info = info;
  media.accepts = new Set(info.media);
  media.model = info.model;
  media.limits = info.limits;
  for (const id of ["attach-image", "record", "attach-audio"]) {
    const kind = id === "attach-image" ? "image" : "audio";
    $(id).setAttribute("aria-disabled", String(Boolean(media.refusal(kind))));
    $(id).title = media.refusal(kind) || $(id).getAttribute("aria-label");
  }
  // engine: loading | ready | unavailable (it may come back: keep asking); the detail is sent to key holders only.
  const states = { ready: "", loading: "Model loading…", unavailable: "The model engine is unavailable right now." };
  const detail = info.engine !== "ready" && info.engine_detail ? ` (${info.engine_detail})` : "";
  ui.state.textContent = (states[info.engine] ?? "") + detail;
  if (!info.ready) setTimeout(loadInfo, 3000);
}

// --- history --------------------------------------------------------------------------------------

async function loadHistory() {
  let conversations;
  try {
    conversations = await keyed(() => getJSON("/conversations"));
  } catch (error) {
    ui.historyEmpty.textContent = `History unavailable: ${error.message}`;
    ui.historyEmpty.hidden = false;
    return;
  }
  ui.history.replaceChildren(
    ...conversations.map((c) => {
      const item = document.createElement("li");
      const open = document.createElement("a");
      open.className = "history-open";
      open.href = `#/c/${encodeURIComponent(c.id)}`;
      open.textContent = c.title || "Untitled";
      open.dir = "auto";
      if (c.id === app.conversationId) open.setAttribute("aria-current", "page");
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "history-delete";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Delete “${c.title}”`);
      remove.addEventListener("click", () => deleteConversation(c));
      item.append(open, remove);
      return item;
    }),
  );
  ui.historyEmpty.textContent = "No conversations yet.";
  ui.historyEmpty.hidden = conversations.length > 0;
}

async function deleteConversation(conversation) {
  if (!confirm(`Delete “${conversation.title}”?`)) return;
  try {
    await keyed(() => call(`/conversations/${encodeURIComponent(conversation.id)}`, { method: "DELETE" }));
  } catch (error) {
    if (error.status !== 404) return note(`Could not delete: ${error.message}`);
  }
  if (conversation.id === app.conversationId) newChat();
  loadHistory();
}

function newChat() {
  if (app.running) return note("Stop the current answer first.");
  app.conversationId = null;
  history.replaceState(null, "", location.pathname);
  ui.thread.replaceChildren(ui.welcome);
  ui.welcome.hidden = false;
  loadHistory();
  ui.question.focus();
}

async function openConversation(id) {
  if (app.running) return;
  let conversation;
  try {
    conversation = await keyed(() => getJSON(`/conversations/${encodeURIComponent(id)}`));
  } catch (error) {
    note(error.status === 404 ? "That conversation no longer exists." : `Could not open it: ${error.message}`);
    return newChat();
  }
  app.conversationId = id;
  ui.welcome.hidden = true;
  ui.thread.replaceChildren(ui.welcome);
  for (const turn of conversation.turns) {
    const view = addView(turn.question, turn.media.map((m) => ({ kind: m.kind })));
    view.showStored(turn);
  }
  loadHistory();
  const pending = JSON.parse(sessionStorage.getItem(PENDING) || "null");
  if (pending?.conversationId === id && !conversation.turns.some((t) => t.message_id === pending.messageId)) {
    run(addView(pending.question), { messageId: pending.messageId }); // still running: follow it again
  }
}

function route() {
  const match = /^#\/c\/(.+)$/.exec(location.hash);
  if (match) openConversation(decodeURIComponent(match[1]));
}

// --- asking ---------------------------------------------------------------------------------------

function addView(question, shown = [], mode = ui.mode.value) {
  const view = new TurnView(question, {
    media: shown,
    onFollowUp: (q) => ask(q),
    onRetry: (v) => ask(v.question, { items: v.items || [], mode: v.mode }),
  });
  view.mode = mode;
  app.views.set(view.root, view);
  ui.welcome.hidden = true;
  ui.thread.append(view.root);
  view.root.scrollIntoView({ block: "start", behavior: "smooth" });
  return view;
}

async function ask(question, { items = media.take(), mode = ui.mode.value } = {}) {
  question = question.trim();
  if (!question || app.running) return;
  if (app.info && question.length > app.info.limits.max_message_chars) {
    return note(`The question is too long (at most ${app.info.limits.max_message_chars} characters).`);
  }
  const view = addView(question, items.map((i) => ({ kind: i.kind, url: i.url, name: i.name })), mode);
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
            history.replaceState(null, "", `#/c/${encodeURIComponent(data.conversation_id)}`);
            const pending = { conversationId: data.conversation_id, messageId: data.message_id, question: view.question };
            sessionStorage.setItem(PENDING, JSON.stringify(pending));
            loadHistory();
          }
          view.onEvent(type, data);
        },
      },
    );
    if (status !== "running") sessionStorage.removeItem(PENDING);
  } catch (error) {
    if (error.name !== "AbortError") view.fail(error.message);
    view.finish("failed");
    if (error.status !== 0) sessionStorage.removeItem(PENDING);
  } finally {
    app.running = null;
    setBusy(false);
    loadHistory();
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
    note(`Could not stop: ${error.message}`);
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
  ui.mode.value = localStorage.getItem("megrez.mode") || app.info?.default_mode || "auto";
  ui.mode.addEventListener("change", () => localStorage.setItem("megrez.mode", ui.mode.value));
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const question = ui.question.value;
    if (!question.trim() || app.running) return;
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
  const pick = (input, kind) => () => {
    const why = media.refusal(kind);
    if (why) return note(why);
    input.click();
  };
  $("attach-image").addEventListener("click", pick($("image-input"), "image"));
  $("attach-audio").addEventListener("click", pick($("audio-input"), "audio"));
  for (const input of [$("image-input"), $("audio-input")]) {
    input.addEventListener("change", () => {
      media.add(input.files);
      input.value = "";
    });
  }
  ui.question.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) {
      event.preventDefault();
      media.add(files);
    }
  });
  document.addEventListener("dragover", (event) => {
    if (event.dataTransfer?.types.includes("Files")) {
      event.preventDefault();
      ui.composer.classList.add("dropping");
    }
  });
  document.addEventListener("dragleave", (event) => event.relatedTarget || ui.composer.classList.remove("dropping"));
  document.addEventListener("drop", (event) => {
    if (!event.dataTransfer?.files.length) return;
    event.preventDefault();
    ui.composer.classList.remove("dropping");
    media.add(event.dataTransfer.files);
  });
  wireRecorder();
}

function wireRecorder() {
  const button = $("record");
  let recorder = null;
  let timer = null;
  button.addEventListener("click", async () => {
    const why = media.refusal("audio") || (!Recorder.supported() && "This browser cannot record audio here.");
    if (why) return note(why);
    if (!recorder) {
      recorder = new Recorder();
      try {
        await recorder.start();
      } catch (error) {
        recorder = null;
        return note(`The microphone is not available: ${error.message}`);
      }
      button.setAttribute("aria-pressed", "true");
      button.classList.add("recording");
      const most = app.info?.limits.max_audio_seconds ?? 120;
      timer = setInterval(() => {
        note(`Recording ${Math.floor(recorder.seconds)} s — click the microphone to stop`);
        if (recorder.seconds >= most) button.click();
      }, 500);
      return;
    }
    clearInterval(timer);
    const done = recorder;
    recorder = null;
    button.setAttribute("aria-pressed", "false");
    button.classList.remove("recording");
    try {
      media.add([await done.stop()]);
      note("");
    } catch (error) {
      note(`The recording could not be used: ${error.message}`);
    }
  });
}

function wireSidebar() {
  $("new-chat").addEventListener("click", newChat);
  ui.toggle.addEventListener("click", () => {
    const open = ui.sidebar.classList.toggle("open");
    ui.toggle.setAttribute("aria-expanded", String(open));
  });
  ui.history.addEventListener("click", (event) => {
    if (event.target.closest(".history-open")) ui.sidebar.classList.remove("open");
  });
  window.addEventListener("hashchange", route);
}

citationPopover($("popover"), (chip) => {
  const view = app.views.get(chip.closest(".turn"));
  const n = Number(chip.dataset.n);
  const info = view?.sourceOf(n);
  return info && { ...info, n };
});
wireComposer();
wireSidebar();
await loadInfo();
ui.mode.value = localStorage.getItem("megrez.mode") || app.info?.default_mode || "auto";
route();
loadHistory();
ui.question.focus();
