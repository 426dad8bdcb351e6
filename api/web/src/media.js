// Images and voice for Megrez-3B-Omni: attached by button, drag and drop or paste; recorded with the
// microphone or uploaded as a clip. A model that reads text only refuses them with a note saying so.
//
// A recording is converted in the browser to 16 kHz mono WAV (the rate the model's audio encoder takes):
// MediaRecorder gives WebM/Opus in Chromium and MP4/AAC in Safari, formats the service does not read,
// while WAV needs no codec on the server. Uploaded clips go as they are (WAV, FLAC, OGG, MP3).

import { label, t } from "./i18n.js";

const RATE = 16000;

/** The attachments of the question being written; `onChange` redraws the thumbnails. */
export class Attachments {
  /**
   * @param {HTMLElement} container where the thumbnails go
   * @param {(key: string, params?: object) => void} note shows a message to the user (an i18n key and its values)
   *
   * Example: `const media = new Attachments(div, showNote); media.limits = info.limits;
   * media.add(fileInput.files); form.append(...media.formParts())`
   */
  constructor(container, note) {
    this.container = container;
    this.note = note;
    this.items = []; // {kind, file, url}
    this.accepts = new Set();
    this.model = "";
    this.limits = { max_images: 4, max_audio: 2 };
  }

  /** Why `kind` ("image" or "audio") cannot be attached, as [key, params] for `note`; null if it can. */
  refusal(kind) {
    if (this.accepts.has(kind)) return null;
    return ["text_only", { model: this.model || "?" }];
  }

  /** Add files (images and audio; anything else is refused with a note). */
  add(files) {
    for (const file of files) {
      const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("audio/") ? "audio" : null;
      if (!kind) {
        this.note("not_media", { name: file.name || t("that_file") });
        continue;
      }
      const why = this.refusal(kind);
      if (why) {
        this.note(...why);
        return;
      }
      const most = kind === "image" ? this.limits.max_images : this.limits.max_audio;
      if (this.items.filter((i) => i.kind === kind).length >= most) {
        this.note(kind === "image" ? "most_images" : "most_audio", { most });
        continue;
      }
      this.items.push({ kind, file, url: URL.createObjectURL(file), name: file.name });
    }
    this.draw();
  }

  remove(item) {
    this.items = this.items.filter((i) => i !== item);
    this.draw();
  }

  /**
   * Wire the page's controls to this list: each kind's button and its file input, paste into the question box,
   * files dropped anywhere on the page (the composer shows where they go), and the record button.
   *
   * @param {object} controls `composer`, `question`, `record`; `image` and `audio`: [button, file input]
   */
  wire({ composer, question, record, image, audio }) {
    for (const [kind, [button, input]] of [["image", image], ["audio", audio]]) {
      button.addEventListener("click", () => {
        const why = this.refusal(kind);
        if (why) return this.note(...why);
        input.click();
      });
      input.addEventListener("change", () => {
        this.add(input.files);
        input.value = "";
      });
    }
    question.addEventListener("paste", (event) => {
      const files = [...(event.clipboardData?.files || [])];
      if (files.length) {
        event.preventDefault();
        this.add(files);
      }
    });
    document.addEventListener("dragover", (event) => {
      if (event.dataTransfer?.types.includes("Files")) {
        event.preventDefault();
        composer.classList.add("dropping");
      }
    });
    document.addEventListener("dragleave", (event) => event.relatedTarget || composer.classList.remove("dropping"));
    document.addEventListener("drop", (event) => {
      if (!event.dataTransfer?.files.length) return;
      event.preventDefault();
      composer.classList.remove("dropping");
      this.add(event.dataTransfer.files);
    });
    this.wireRecorder(record);
  }

  /** The record button: a click starts recording, the next one (or the time limit) adds the clip. */
  wireRecorder(button) {
    let recorder = null;
    let timer = null;
    button.addEventListener("click", async () => {
      const why = this.refusal("audio") || (!Recorder.supported() && ["no_recording"]);
      if (why) return this.note(...why);
      if (!recorder) {
        recorder = new Recorder();
        try {
          await recorder.start();
        } catch (error) {
          recorder = null;
          return this.note("no_microphone", { error: error.message });
        }
        button.setAttribute("aria-pressed", "true");
        button.classList.add("recording");
        const most = this.limits.max_audio_seconds ?? 120;
        timer = setInterval(() => {
          this.note("recording", { seconds: Math.floor(recorder.seconds) });
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
        this.add([await done.stop()]);
        this.note("raw", { text: "" });
      } catch (error) {
        this.note("bad_recording", { error: error.message });
      }
    });
  }

  /** Hand the items over (for the question being sent) and start empty. */
  take() {
    const items = this.items;
    this.items = [];
    this.draw();
    return items;
  }

  draw() {
    this.container.replaceChildren();
    for (const item of this.items) {
      const chip = document.createElement("div");
      chip.className = `attachment ${item.kind}`;
      if (item.kind === "image") {
        const img = document.createElement("img");
        img.src = item.url;
        img.alt = item.name || "image";
        chip.append(img);
      } else {
        const audio = document.createElement("audio");
        audio.controls = true;
        audio.src = item.url;
        chip.append(audio);
      }
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      label(remove, "remove", { name: item.name || t(item.kind) }, "aria-label");
      remove.addEventListener("click", () => this.remove(item));
      chip.append(remove);
      this.container.append(chip);
    }
    this.container.hidden = this.items.length === 0;
  }
}

/** The form parts of `items` for POST /chat (multipart: `images` and `audio` file parts). */
export function appendMedia(form, items) {
  for (const item of items) form.append(item.kind === "image" ? "images" : "audio", item.file, item.name || item.kind);
}

/** Microphone recording; `stop()` resolves to a WAV File. */
export class Recorder {
  static supported = () => Boolean(navigator.mediaDevices?.getUserMedia && window.MediaRecorder);

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    this.chunks = [];
    this.recorder = new MediaRecorder(this.stream);
    this.recorder.addEventListener("dataavailable", (e) => e.data.size && this.chunks.push(e.data));
    this.started = performance.now();
    this.recorder.start();
  }

  get seconds() {
    return (performance.now() - this.started) / 1000;
  }

  async stop() {
    const stopped = new Promise((resolve) => this.recorder.addEventListener("stop", resolve, { once: true }));
    this.recorder.stop();
    await stopped;
    for (const track of this.stream.getTracks()) track.stop();
    const blob = new Blob(this.chunks, { type: this.recorder.mimeType });
    return new File([await toWav(blob)], "recording.wav", { type: "audio/wav" });
  }
}

/** Any audio the browser can decode → 16 kHz mono 16-bit WAV bytes. */
export async function toWav(blob) {
  const decoded = await new AudioContext().decodeAudioData(await blob.arrayBuffer());
  const frames = Math.max(1, Math.ceil(decoded.duration * RATE));
  const offline = new OfflineAudioContext(1, frames, RATE); // resamples and mixes down to mono
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const samples = (await offline.startRendering()).getChannelData(0);
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (at, s) => [...s].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true); // PCM header size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, RATE, true);
  view.setUint32(28, RATE * 2, true); // bytes per second
  view.setUint16(32, 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  text(36, "data");
  view.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, s)) * 0x7fff, true));
  return view.buffer;
}
