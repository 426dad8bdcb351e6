// Talking to the service: JSON calls with the stored API key, and one message's SSE stream followed to
// its end across dropped connections.
//
// The stream is read with fetch and a stream reader, not EventSource: a question is a POST with a body
// (text, images, audio), which EventSource cannot send, and EventSource cannot set the Authorization
// header either. Every event carries an `id:`; after a dropped connection the stream is picked up with
// GET /chat/{message_id}/events and `Last-Event-ID: <last id seen>`, so the service replays exactly
// what was missed: no event is lost and none is handled twice.

const KEY_STORAGE = "megrez.apiKey";
const MAX_RECONNECTS = 8;

export class ApiError extends Error {
  /** @param {number} status HTTP status (0: no answer) @param {string} message for the user */
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const storedKey = () => localStorage.getItem(KEY_STORAGE) || "";
export const saveKey = (key) =>
  key ? localStorage.setItem(KEY_STORAGE, key) : localStorage.removeItem(KEY_STORAGE);

function withKey(headers = {}) {
  const key = storedKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const detail = body.detail ?? body.error?.message;
    if (typeof detail === "string") message = detail;
    else if (Array.isArray(detail)) message = detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

/** fetch with the key; a non-2xx answer throws ApiError with the service's own message. */
export async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: withKey(options.headers) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "the service cannot be reached");
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export const getJSON = async (path) => (await call(path)).json();

/** SSE frames of a response body: {event, id, data}; comments (heartbeats) skipped. */
async function* frames(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let match;
      // A frame ends with a blank line; sse-starlette writes CRLF, other servers LF.
      while ((match = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const frame = { event: "message", id: null, data: [] };
        for (const line of block.split(/\r\n|\r|\n/)) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") frame.data.push(value);
          else if (field === "event") frame.event = value;
          else if (field === "id") frame.id = value;
        }
        if (frame.data.length) yield { ...frame, data: frame.data.join("\n") };
      }
    }
  } finally {
    reader.releaseLock();
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });

/**
 * Follow one message's events until `done`, reconnecting after a dropped connection.
 *
 * @param {object} start `{response}` (the POST /chat answer) or `{messageId}` (resume from the start,
 *   e.g. after a reload)
 * @param {object} hooks `onEvent(type, data)` once per event, in order; `onConnection(state, attempt)`
 *   with "reconnecting" / "connected"; `signal` to give up
 * @returns {Promise<string>} the `done` status: done, stopped or failed
 */
export async function follow(start, { onEvent, onConnection = () => {}, signal } = {}) {
  let { response, messageId = null } = start;
  let lastId = null;
  let attempt = 0;
  for (;;) {
    if (!response) {
      const headers = { Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      try {
        response = await call(`/chat/${encodeURIComponent(messageId)}/events`, { headers, signal });
        if (attempt) onConnection("connected", attempt);
      } catch (error) {
        if (signal?.aborted || (error.status && error.status < 500 && error.status !== 429)) throw error;
      }
    }
    if (response) {
      try {
        for await (const frame of frames(response.body)) {
          const data = JSON.parse(frame.data);
          if (frame.id) lastId = frame.id;
          if (frame.event === "meta") messageId = data.message_id;
          attempt = 0;
          onEvent(frame.event, data);
          if (frame.event === "done") return data.status;
        }
      } catch (error) {
        if (signal?.aborted) throw error;
        // a dropped connection: resume below
      }
      response = null;
    }
    if (!messageId) throw new ApiError(0, "the connection dropped before the service took the question");
    if (++attempt > MAX_RECONNECTS) throw new ApiError(0, "lost the connection to the service");
    onConnection("reconnecting", attempt);
    await sleep(Math.min(8000, 200 * 2 ** (attempt - 1)), signal);
    if (signal?.aborted) throw new DOMException("aborted", "AbortError");
  }
}
