// Rendering untrusted text: the model's Markdown answer and the sources' titles, snippets and passages.
//
// Page text and model output are both untrusted. The answer goes through marked (Markdown → HTML) with
// raw HTML shown as text rather than parsed, then DOMPurify with a short allow-list of tags and only
// http(s)/mailto links; everything else (titles, snippets, passages) is only ever set as textContent,
// and source URLs become links only when they are http(s). The page's Content-Security-Policy refuses
// inline script besides, so a miss here still cannot run code.
//
// Citation markers `[n]` in the rendered text become chips linking to source n; hovering, focusing or
// (on touch screens) tapping a chip shows the passage the model was given for it. Markers inside code
// stay text, and a number with no source stays text too (the agent already drops unknown numbers).
// A chip is a 24 px target at least (WCAG 2.2 target size), and its popover is placed where it covers
// neither another chip of the answer nor the ask box.
//
// Copy and Export give an answer as Markdown: its text with the `[n]` markers kept, then the sources it
// cites, numbered, with their URLs (`answerMarkdown`).

import DOMPurify from "dompurify";
import { Marked } from "marked";
import { label, t } from "./i18n.js";

const ALLOWED_TAGS = [
  "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "ol",
  "p", "pre", "strong", "sub", "sup", "table", "tbody", "td", "th", "thead", "tr", "ul",
];
const escapeHtml = (s) =>
  s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const markdown = new Marked({
  gfm: true,
  async: false,
  renderer: {
    html: ({ text }) => escapeHtml(text), // raw HTML in model output is shown, never parsed
  },
});

/** An http(s) URL as a string, or null (javascript:, data:, relative, unparsable). */
export function safeUrl(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

/** A link that opens in a new tab and tells the target nothing about this page. */
export function externalLink(url, className) {
  const href = safeUrl(url);
  const a = document.createElement(href ? "a" : "span");
  if (href) {
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
  }
  if (className) a.className = className;
  return a;
}

/** Sanitised HTML of Markdown `text`. */
export function markdownHtml(text) {
  return DOMPurify.sanitize(markdown.parse(text), {
    ALLOWED_TAGS,
    ALLOWED_ATTR: ["href", "title", "start", "align", "colspan", "rowspan"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  });
}

const CITATION = /\[(\d{1,3})\]/g;

/**
 * Render `text` into `element`, with citation chips.
 *
 * @param {HTMLElement} element the answer's container (its content is replaced)
 * @param {string} text the answer so far (Markdown, citations as [n])
 * @param {(n: number) => {url: string, title: string, supported?: boolean|null}|undefined} sourceOf
 */
export function renderAnswer(element, text, sourceOf) {
  element.innerHTML = markdownHtml(text);
  for (const a of element.querySelectorAll("a[href]")) {
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
  }
  const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT, {
    acceptNode: (node) =>
      node.parentElement.closest("code, pre, a") || !node.nodeValue.includes("[")
        ? NodeFilter.FILTER_REJECT
        : NodeFilter.FILTER_ACCEPT,
  });
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const text = node.nodeValue;
    const parts = document.createDocumentFragment();
    let last = 0;
    for (const match of text.matchAll(CITATION)) {
      const n = Number(match[1]);
      const source = sourceOf(n);
      if (!source) continue;
      parts.append(text.slice(last, match.index), chip(n, source));
      last = match.index + match[0].length;
    }
    if (last) {
      parts.append(text.slice(last));
      node.replaceWith(parts);
    }
  }
}

function chip(n, source) {
  const a = externalLink(source.url, "chip");
  a.textContent = String(n);
  a.dataset.n = String(n);
  const unsupported = source.supported === false;
  if (unsupported) a.classList.add("unsupported");
  return label(a, "chip", { n, title: source.title || source.url, unsupported }, "aria-label");
}

const escapeMarkdown = (s) => s.replace(/[\\`*_[\]<>]/g, "\\$&");

/**
 * An answer as Markdown: `text` with its `[n]` markers, then the sources it cites, numbered, with their URLs.
 *
 * @param {string} text the answer (Markdown, citations as [n])
 * @param {(n: number) => {url: string, title?: string}|undefined} sourceOf source n
 * @returns {string} e.g. "… Champ de Mars [1].\n\n**Sources**\n\n- [1] [Eiffel Tower](https://…)\n"
 */
export function answerMarkdown(text, sourceOf) {
  const cited = [...new Set([...text.matchAll(CITATION)].map((m) => Number(m[1])))]
    .filter((n) => sourceOf(n))
    .sort((a, b) => a - b);
  const body = text.trim();
  if (!cited.length) return `${body}\n`;
  const lines = cited.map((n) => {
    const source = sourceOf(n);
    const title = escapeMarkdown((source.title || source.url).replace(/\s+/g, " "));
    const href = safeUrl(source.url);
    // Parentheses would end a Markdown link's destination early.
    if (!href) return `- [${n}] ${title} (${source.url})`;
    return `- [${n}] [${title}](${href.replace(/[()]/g, encodeURIComponent)})`;
  });
  return `${body}\n\n**${t("sources")}**\n\n${lines.join("\n")}\n`;
}

const GAP = 6; // between a chip and its popover
const CRAMPED = 96; // a popover this low (px) shows too little of its passage: used only when nothing else fits

/**
 * Place `popover` above or below `target`: the side where it covers no other chip of the answer and stays
 * inside `room` (the reading area above the ask box), else the side where it covers the fewest, cut to fit
 * (its passage scrolls).
 */
function place(popover, target, room) {
  popover.style.maxHeight = "";
  const box = target.getBoundingClientRect();
  const width = Math.min(360, window.innerWidth - 16);
  popover.style.width = `${width}px`;
  const left = Math.max(8, Math.min(box.left, window.innerWidth - width - 8));
  const height = popover.offsetHeight;
  const { top, bottom } = room();
  const others = [...(target.closest(".answer")?.querySelectorAll(".chip") ?? [])]
    .filter((chip) => chip !== target)
    .map((chip) => chip.getBoundingClientRect());
  const sides = [
    { from: box.bottom + GAP, space: bottom - box.bottom - GAP, above: false },
    { from: box.top - GAP, space: box.top - GAP - top, above: true },
  ].map(({ from, space, above }) => {
    const h = Math.max(0, Math.min(height, space));
    const y = above ? from - h : from;
    const hits = others.filter((r) => r.left < left + width && r.right > left && r.top < y + h && r.bottom > y);
    return { y, h, hits: hits.length, cramped: h < Math.min(height, CRAMPED) };
  });
  const best = sides.sort((a, b) => a.cramped - b.cramped || a.hits - b.hits || b.h - a.h)[0];
  if (best.h < height) popover.style.maxHeight = `${best.h}px`;
  popover.style.left = `${left + window.scrollX}px`;
  popover.style.top = `${best.y + window.scrollY}px`;
}

/**
 * The one popover of the page: shows a chip's source and passage on hover, focus or tap.
 *
 * @param {HTMLElement} popover the (hidden) popover element
 * @param {(chip: HTMLElement) => {n, url, title, domain?, passage?, snippet?, supported?}|undefined} lookup
 * @param {() => {top: number, bottom: number}} room where a popover may go (viewport pixels): the reading
 *   area, above the ask box
 */
export function citationPopover(popover, lookup, room = () => ({ top: 0, bottom: window.innerHeight })) {
  let current = null; // the chip whose popover shows
  let pinned = null; // the chip a tap opened: a second tap on it follows its link
  let touched = false; // the last pointer was a finger (or a pen)
  const hide = () => {
    popover.hidden = true;
    current?.removeAttribute("aria-describedby");
    current = pinned = null;
  };
  const show = (target) => {
    const info = lookup(target);
    if (!info) return;
    current?.removeAttribute("aria-describedby");
    current = target;
    popover.replaceChildren();
    const head = externalLink(info.url, "popover-title");
    head.textContent = `[${info.n}] ${info.title || info.url}`;
    const domain = document.createElement("p");
    domain.className = "popover-domain";
    domain.textContent = info.domain || "";
    const passage = document.createElement("p");
    passage.className = "popover-passage";
    passage.textContent = info.passage || info.snippet || "";
    popover.append(head, domain, passage);
    if (info.supported === false) {
      const warn = document.createElement("p");
      warn.className = "popover-warning";
      warn.textContent = t("unsupported");
      popover.append(warn);
    }
    popover.id ||= "popover";
    target.setAttribute("aria-describedby", popover.id);
    popover.hidden = false;
    place(popover, target, room);
  };
  const chipOf = (event) => event.target.closest?.(".chip");
  document.addEventListener("pointerdown", (e) => (touched = e.pointerType !== "mouse"), true);
  document.addEventListener("mouseover", (e) => {
    const target = chipOf(e);
    if (target && target !== current) show(target);
    else if (!target && current && !pinned && !popover.contains(e.target)) hide();
  });
  document.addEventListener("focusin", (e) => (chipOf(e) ? show(chipOf(e)) : popover.contains(e.target) || hide()));
  document.addEventListener("click", (e) => {
    const target = chipOf(e);
    if (target && touched && target !== pinned) {
      e.preventDefault(); // a finger cannot hover: the first tap shows the passage, the popover's title links
      show(target);
      pinned = target;
    } else if (!target && !popover.contains(e.target)) hide();
  });
  document.addEventListener("keydown", (e) => e.key === "Escape" && hide());
  window.addEventListener("resize", hide);
  // The thread scrolls: the popover goes along with its chip while the chip is in the reading area.
  const follow = () => {
    const { top, bottom } = current.getBoundingClientRect();
    const area = room();
    if (top < area.top || bottom > area.bottom) hide();
    else place(popover, current, room);
  };
  document.addEventListener("scroll", (e) => current && !popover.contains(e.target) && follow(), true);
}
