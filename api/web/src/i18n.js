// The interface in Chinese and English: every label, status, note and error of the page (the wordings are in
// strings.js).
//
// The language is the first of the browser's (navigator.languages) that the page speaks, unless the reader
// chose one with the switch (kept in localStorage). What the service says arrives as codes with values
// (agent/events.py: a status's `code`, a note's `code`, an error's `code`; /info's `setup` hints), worded
// here; a code the page does not know, or a record stored before codes existed, shows the service's English
// `message` instead.
//
// Text is set with `label(node, key, params)`, which also records the key on the node, so switching the
// language re-words the whole page in place (`relabel`), the thread already on screen included.

import { STRINGS } from "./strings.js";

const STORAGE = "megrez.lang";

function preferred() {
  const saved = localStorage.getItem(STORAGE);
  if (saved in STRINGS) return saved;
  for (const tag of navigator.languages ?? [navigator.language]) {
    const base = String(tag).toLowerCase().split("-")[0];
    if (base in STRINGS) return base;
  }
  return "en";
}

let current = preferred();

/** The interface's language: "en" or "zh". */
export const lang = () => current;

/** Whether `key` has a wording (a code the page knows). */
export const knows = (key) => key in STRINGS.en;

/**
 * The wording of `key` in the interface's language.
 *
 * @param {string} key a key of STRINGS (e.g. "copy", "note.pages_failed")
 * @param {object} params values the wording names ({query}, {n}, …)
 */
export function t(key, params = {}) {
  const entry = STRINGS[current][key] ?? STRINGS.en[key];
  if (entry === undefined) return params.text ?? key;
  if (typeof entry === "function") return entry(params, t);
  if (Array.isArray(entry)) return entry;
  return entry.replace(/\{(\w+)\}/g, (_, name) => String(params[name] ?? ""));
}

const datasetKey = (attr) => `t${attr === "text" ? "" : attr.replace(/(^|-)(\w)/g, (_, __, c) => c.toUpperCase())}`;

/**
 * Word `node` (its text, or attribute `attr`) with `key`, and remember it for a change of language.
 *
 * @param {Element} node the element
 * @param {string} key see `t`
 * @param {object} params see `t`
 * @param {string} attr "text" (the default) or an attribute name ("aria-label", "title", …)
 *
 * Example: `label(button, "rename", {title: c.title}, "aria-label")`
 */
export function label(node, key, params = {}, attr = "text") {
  node.dataset.i18n = "";
  node.dataset[datasetKey(attr)] = key;
  node.dataset[`${datasetKey(attr)}Args`] = JSON.stringify(params);
  const text = t(key, params);
  if (attr === "text") node.textContent = text;
  else node.setAttribute(attr, text);
  return node;
}

/** Word again every labelled element under `root` (after a change of language). */
export function relabel(root = document) {
  const nodes = root.querySelectorAll("[data-i18n]");
  for (const node of nodes) {
    for (const [name, key] of Object.entries(node.dataset)) {
      if (!/^t($|[A-Z])/.test(name) || name.endsWith("Args")) continue;
      const params = JSON.parse(node.dataset[`${name}Args`] || "{}");
      const attr = name === "t" ? "text" : name.slice(1).replace(/[A-Z]/g, (c, i) => (i ? "-" : "") + c.toLowerCase());
      label(node, key, params, attr);
    }
  }
}

/** Switch the interface to `language` (remembered), word the page again and set `<html lang>`. */
export function setLanguage(language) {
  current = language in STRINGS ? language : "en";
  localStorage.setItem(STORAGE, current);
  document.documentElement.lang = current === "zh" ? "zh-CN" : "en";
  relabel();
}

/** [key, params] of a service note: a code the page words, or the note's own (English) text. */
export function noteLabel(note) {
  if (typeof note === "string") return ["raw", { text: note }];
  if (note.code && note.code !== "other" && knows(`note.${note.code}`)) return [`note.${note.code}`, note.params ?? {}];
  return ["raw", { text: note.message }];
}

/** [key, params] of an error: an error event's `code`, an HTTP status (ApiError), else its message. */
export function errorLabel(error) {
  if (error?.code && knows(`error.${error.code}`)) return [`error.${error.code}`, {}];
  if (typeof error?.status === "number" && knows(`http.${error.status}`)) {
    return [`http.${error.status}`, { message: error.message }];
  }
  return ["raw", { text: error?.message ?? String(error) }];
}

/** `date` (seconds since the epoch) short: the time today, the day this year, else the full date. */
export function shortDate(seconds) {
  const date = new Date(seconds * 1000);
  const now = new Date();
  const locale = current === "zh" ? "zh-CN" : "en";
  const options = date.toDateString() === now.toDateString()
    ? { hour: "2-digit", minute: "2-digit" }
    : date.getFullYear() === now.getFullYear()
      ? { month: "short", day: "numeric" }
      : { year: "numeric", month: "short", day: "numeric" };
  return new Intl.DateTimeFormat(locale, options).format(date);
}

/** `date` (seconds since the epoch) in full, for a tooltip. */
export const fullDate = (seconds) =>
  new Intl.DateTimeFormat(current === "zh" ? "zh-CN" : "en", { dateStyle: "full", timeStyle: "short" })
    .format(new Date(seconds * 1000));

document.documentElement.lang = current === "zh" ? "zh-CN" : "en";
