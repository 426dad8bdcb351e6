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

import DOMPurify from "dompurify";
import { Marked } from "marked";

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
  a.setAttribute("aria-label", `Source ${n}: ${source.title}${unsupported ? " (may not support this)" : ""}`);
  return a;
}

/**
 * The one popover of the page: shows a chip's source and passage on hover, focus or tap.
 *
 * @param {HTMLElement} popover the (hidden) popover element
 * @param {(chip: HTMLElement) => {n, url, title, domain?, passage?, snippet?, supported?}|undefined} lookup
 */
export function citationPopover(popover, lookup) {
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
      warn.textContent = "The support check found this passage may not back the sentence citing it.";
      popover.append(warn);
    }
    popover.id ||= "popover";
    target.setAttribute("aria-describedby", popover.id);
    popover.hidden = false;
    const box = target.getBoundingClientRect();
    const width = Math.min(360, window.innerWidth - 16);
    popover.style.width = `${width}px`;
    popover.style.left = `${Math.max(8, Math.min(box.left, window.innerWidth - width - 8)) + window.scrollX}px`;
    const below = box.bottom + 6 + popover.offsetHeight < window.innerHeight;
    popover.style.top = `${(below ? box.bottom + 6 : box.top - 6 - popover.offsetHeight) + window.scrollY}px`;
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
  document.addEventListener("scroll", (e) => popover.contains(e.target) || hide(), true); // the thread scrolls
}
