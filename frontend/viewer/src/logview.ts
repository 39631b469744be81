// The virtualised list: only the rows in (and just around) the viewport are in the DOM. A spacer
// gives the scroller the height of every row; the rows shown sit in a window placed at the first
// one's offset. Unwrapped, every row is one line high; wrapped, a row's height is estimated from its
// length (monospace, with break-all wrapping, so the estimate is exact but for tabs and wide
// characters), and the window's rows flow, so a wrong estimate never overlaps two rows.
import { AnsiUp } from 'ansi_up';

import { Kind, type Line, OutputLog, plainText, upperBound, visibleText } from './model';

const OVERSCAN = 8;
const PAD = 6;
// Browsers cap an element's height (Chromium near 33 million px): past this the scroller is scaled.
const MAX_PX = 15_000_000;
// A row shows at most this much of a line; the download has all of it.
export const MAX_SHOWN = 20_000;
const ANSI_CACHE = 4000;

const ansiCache = new Map<string, string>();

/** ansi_up's HTML for a line (it escapes HTML); a fresh parser per line, so colours end with it. */
function ansiHtml(text: string): string {
  let html = ansiCache.get(text);
  if (html === undefined) {
    const parser = new AnsiUp();
    parser.use_classes = true;
    html = parser.ansi_to_html(text);
    if (ansiCache.size >= ANSI_CACHE) ansiCache.delete(ansiCache.keys().next().value as string);
    ansiCache.set(text, html);
  }
  return html;
}

/** Wraps each match of `pattern` in the element's text in <mark>, across ansi_up's spans. */
function markMatches(element: HTMLElement, pattern: RegExp): number {
  const nodes: Text[] = [];
  const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) nodes.push(node as Text);
  const text = nodes.map((node) => node.data).join('');
  const ranges: [number, number][] = [];
  pattern.lastIndex = 0;
  for (let match = pattern.exec(text); match && ranges.length < 500; match = pattern.exec(text)) {
    if (match[0] === '') {
      pattern.lastIndex += 1;
      continue;
    }
    ranges.push([match.index, match.index + match[0].length]);
  }
  let offset = 0;
  for (const node of nodes) {
    const start = offset;
    const end = start + node.data.length;
    offset = end;
    // Right to left, so that splitting leaves the earlier offsets of this node as they were.
    for (let r = ranges.length - 1; r >= 0; r -= 1) {
      const [from, to] = ranges[r];
      if (to <= start || from >= end) continue;
      const a = Math.max(from, start) - start;
      const b = Math.min(to, end) - start;
      const middle = node.splitText(a);
      middle.splitText(b - a);
      const mark = document.createElement('mark');
      middle.replaceWith(mark);
      mark.append(middle);
    }
  }
  return ranges.length;
}

const ESCAPED_BYTE = /\\x[0-9a-f]{2}/g;

/** Plain text, with BASE64 chunks' escaped bytes set apart. */
function setText(element: HTMLElement, text: string, binary: boolean): void {
  if (!binary) {
    element.textContent = text;
    return;
  }
  let last = 0;
  for (const match of text.matchAll(ESCAPED_BYTE)) {
    if (match.index > last) element.append(text.slice(last, match.index));
    const span = document.createElement('span');
    span.className = 'byte';
    span.textContent = match[0];
    element.append(span);
    last = match.index + match[0].length;
  }
  if (last < text.length) element.append(text.slice(last));
}

interface Rendered {
  line: Line;
  key: string;
  element: HTMLElement;
}

export interface LogViewOptions {
  onFollowChange: (following: boolean) => void;
  onRender: () => void;
}

export class LogView {
  readonly scroller: HTMLElement;
  private readonly spacer: HTMLElement;
  private readonly window: HTMLElement;
  private model: OutputLog;
  private hide = false;
  private highlight: RegExp | null = null;
  private wrap = false;
  private currentMatch = -1;
  following = true;
  private frame = 0;
  private rowHeight = 18;
  private charWidth = 8;
  private columns = 80;
  private gutterDigits = 0;
  // Rows before each position, in row units: cum[i] for i <= cumLength (wrapped only).
  private cum = new Float64Array(1024);
  private cumLength = 0;
  private layoutChanged = true;
  private scale = 1;
  private rendered = new Map<number, Rendered>();
  private readonly resize: ResizeObserver;

  constructor(
    parent: HTMLElement,
    model: OutputLog,
    private readonly options: LogViewOptions,
  ) {
    this.model = model;
    this.scroller = document.createElement('div');
    this.scroller.className = 'log';
    this.scroller.tabIndex = 0;
    this.scroller.setAttribute('role', 'log');
    this.scroller.setAttribute('aria-live', 'off');
    this.spacer = document.createElement('div');
    this.spacer.className = 'log-spacer';
    this.window = document.createElement('div');
    this.window.className = 'log-window';
    this.scroller.append(this.spacer, this.window);
    parent.append(this.scroller);
    this.measure();
    this.scroller.addEventListener('scroll', () => this.onScroll(), { passive: true });
    this.scroller.addEventListener('wheel', (event) => event.deltaY < 0 && this.setFollowing(false), { passive: true });
    this.scroller.addEventListener('keydown', (event) => {
      if (['ArrowUp', 'PageUp', 'Home'].includes(event.key)) this.setFollowing(false);
    });
    this.resize = new ResizeObserver(() => {
      this.layoutChanged = true;
      this.schedule();
    });
    this.resize.observe(this.scroller);
  }

  destroy(): void {
    cancelAnimationFrame(this.frame);
    this.resize.disconnect();
    this.scroller.remove();
  }

  setModel(model: OutputLog): void {
    this.model = model;
    this.rendered.clear();
    this.window.replaceChildren();
    this.layoutChanged = true;
    this.currentMatch = -1;
    this.schedule();
  }

  /** hide: show matching lines only; highlight: mark matches in what is shown. */
  setFilter(hide: boolean, highlight: RegExp | null): void {
    this.hide = hide;
    this.highlight = highlight;
    this.layoutChanged = true;
    this.currentMatch = -1;
    this.schedule();
  }

  setWrap(wrap: boolean): void {
    this.wrap = wrap;
    this.scroller.classList.toggle('wrap', wrap);
    this.layoutChanged = true;
    this.measure();
    this.schedule();
  }

  setFollowing(following: boolean): void {
    if (this.following === following) return;
    this.following = following;
    this.options.onFollowChange(following);
    if (following) this.schedule();
  }

  /** Rows in the DOM now (the tests read it). */
  get domRows(): number {
    return this.window.childElementCount;
  }

  /** How many positions the list has: every retained line, or the matching ones only. */
  count(): number {
    return this.hide ? this.model.matches.length : this.model.lines.length;
  }

  private absoluteAt(position: number): number {
    return this.hide ? this.model.matches[position] : this.model.base + position;
  }

  private positionOf(absolute: number): number {
    if (!this.hide) return absolute - this.model.base;
    let low = 0;
    let high = this.model.matches.length;
    while (low < high) {
      const mid = (low + high) >> 1;
      if (this.model.matches[mid] < absolute) low = mid + 1;
      else high = mid;
    }
    return low;
  }

  /** Scrolls the next (or previous) match into the middle of the view; its number, or -1. */
  gotoMatch(step: 1 | -1): number {
    const matches = this.model.matches;
    if (matches.length === 0) return -1;
    let next: number;
    if (this.currentMatch >= 0 && this.currentMatch < matches.length) {
      next = (this.currentMatch + step + matches.length) % matches.length;
    } else {
      const top = this.absoluteAt(Math.min(this.count() - 1, this.firstVisible()));
      const after = upperBound(matches, top - 1);
      next = step === 1 ? after % matches.length : (after - 1 + matches.length) % matches.length;
    }
    this.currentMatch = next;
    this.setFollowing(false);
    const position = this.positionOf(matches[next]);
    const rowsBefore = this.wrap ? this.rowsBefore(position) : position;
    const target = (PAD + rowsBefore * this.rowHeight - this.scroller.clientHeight / 2) / this.scale;
    this.scroller.scrollTop = Math.max(0, target);
    this.schedule();
    return next;
  }

  get matchIndex(): number {
    return this.currentMatch;
  }

  jumpToLatest(): void {
    this.setFollowing(true);
    this.schedule();
  }

  schedule(): void {
    if (this.frame === 0) this.frame = requestAnimationFrame(() => this.render());
  }

  private firstVisible(): number {
    const rows = Math.max(0, (this.scroller.scrollTop * this.scale - PAD) / this.rowHeight);
    return this.wrap ? Math.max(0, upperBound(this.cum.subarray(0, this.cumLength + 1), rows) - 1) : Math.floor(rows);
  }

  private rowsBefore(position: number): number {
    this.extendCum(Math.min(position, this.count()));
    return this.cum[Math.min(position, this.cumLength)];
  }

  private measure(): void {
    const probe = document.createElement('div');
    probe.className = 'row';
    probe.style.visibility = 'hidden';
    probe.style.position = 'absolute';
    const text = document.createElement('span');
    text.className = 'text';
    text.textContent = 'M'.repeat(100);
    probe.append(text);
    this.window.append(probe);
    this.rowHeight = probe.getBoundingClientRect().height || 18;
    this.charWidth = text.getBoundingClientRect().width / 100 || 8;
    probe.remove();
  }

  private onScroll(): void {
    const { scrollTop, clientHeight, scrollHeight } = this.scroller;
    const atBottom = scrollTop + clientHeight >= scrollHeight - this.rowHeight / 2;
    if (atBottom && !this.following) this.setFollowing(true);
    else if (!atBottom && this.following) this.setFollowing(false);
    this.schedule();
  }

  private rowsOf(line: Line): number {
    if (!this.wrap) return 1;
    const text = plainText(line);
    let length = Math.min(text.length, MAX_SHOWN);
    for (let i = text.indexOf('\t'); i >= 0 && i < MAX_SHOWN; i = text.indexOf('\t', i + 1)) length += 7;
    return Math.max(1, Math.ceil(length / this.columns));
  }

  private extendCum(upTo: number): void {
    if (this.cum.length < upTo + 1) {
      const grown = new Float64Array(Math.max(upTo + 1, this.cum.length * 2));
      grown.set(this.cum.subarray(0, this.cumLength + 1));
      this.cum = grown;
    }
    for (let i = this.cumLength; i < upTo; i += 1) {
      this.cum[i + 1] = this.cum[i] + this.rowsOf(this.model.line(this.absoluteAt(i)));
    }
    this.cumLength = Math.max(this.cumLength, upTo);
  }

  private render(): void {
    this.frame = 0;
    const changes = this.model.takeChanges();
    const count = this.count();
    const dropped = this.hide ? changes.droppedMatches : changes.droppedLines;
    let droppedRows = 0;
    if (dropped > 0 && !this.following) {
      droppedRows = this.wrap ? this.cum[Math.min(dropped, this.cumLength)] : dropped;
    }
    const digits = Math.max(3, String(this.model.end).length);
    if (digits !== this.gutterDigits) {
      this.gutterDigits = digits;
      this.scroller.style.setProperty('--gutter', `${digits}ch`);
      this.layoutChanged = true;
    }
    if (this.layoutChanged) {
      const gutter = (digits + 2) * this.charWidth;
      this.columns = Math.max(10, Math.floor((this.scroller.clientWidth - gutter - 2 * PAD - 16) / this.charWidth));
    }
    if (this.wrap) {
      if (changes.reset || dropped > 0 || this.layoutChanged) this.cumLength = 0;
      else if (changes.changedFrom !== Infinity) {
        this.cumLength = Math.min(this.cumLength, this.positionOf(changes.changedFrom));
      }
      this.cumLength = Math.min(this.cumLength, count);
      this.extendCum(count);
    }
    if (changes.reset || dropped > 0 || this.layoutChanged) {
      this.rendered.clear();
      this.window.replaceChildren();
    }
    this.layoutChanged = false;

    const totalRows = this.wrap ? this.cum[count] : count;
    const totalPx = totalRows * this.rowHeight + 2 * PAD;
    const physical = Math.min(totalPx, MAX_PX);
    this.scale = totalPx / physical;
    this.spacer.style.height = `${physical}px`;
    const longest = Math.min(this.model.longest, MAX_SHOWN);
    this.spacer.style.width = this.wrap ? '1px' : `${(longest + digits + 3) * this.charWidth + 2 * PAD}px`;
    if (droppedRows > 0) this.scroller.scrollTop -= (droppedRows * this.rowHeight) / this.scale;
    if (this.following) this.scroller.scrollTop = this.scroller.scrollHeight;

    const scrollTop = this.scroller.scrollTop;
    const virtualTop = scrollTop * this.scale - PAD;
    const firstRow = Math.max(0, Math.floor(virtualTop / this.rowHeight));
    const lastRow = Math.ceil((virtualTop + this.scroller.clientHeight) / this.rowHeight);
    let first: number;
    let last: number;
    if (this.wrap) {
      const cum = this.cum.subarray(0, count + 1);
      first = Math.max(0, upperBound(cum, firstRow) - 1);
      last = Math.min(count, upperBound(cum, lastRow));
    } else {
      first = Math.min(firstRow, count);
      last = Math.min(count, lastRow + 1);
    }
    first = Math.max(0, first - OVERSCAN);
    last = Math.min(count, last + OVERSCAN);
    this.renderRows(first, last);
    const offset = PAD + (this.wrap ? this.cum[first] : first) * this.rowHeight;
    this.window.style.transform = `translateY(${scrollTop - (scrollTop * this.scale - offset)}px)`;
    this.options.onRender();
  }

  private renderRows(first: number, last: number): void {
    const highlightKey = this.highlight ? this.highlight.source + this.highlight.flags : '';
    const current = this.currentMatch >= 0 ? this.model.matches[this.currentMatch] : -1;
    const next = new Map<number, Rendered>();
    const elements: HTMLElement[] = [];
    for (let position = first; position < last; position += 1) {
      const absolute = this.absoluteAt(position);
      const line = this.model.line(absolute);
      const key = `${line.text.length}|${highlightKey}|${absolute === current}`;
      let row = this.rendered.get(absolute);
      if (row === undefined || row.line !== line || row.key !== key) {
        row = { line, key, element: this.row(line, absolute === current) };
      }
      next.set(absolute, row);
      elements.push(row.element);
    }
    // Rows kept stay in place (a selection in them survives new output); others come and go.
    for (const [absolute, row] of this.rendered) {
      if (next.get(absolute) !== row) row.element.remove();
    }
    let cursor = this.window.firstChild;
    for (const element of elements) {
      if (element === cursor) cursor = cursor.nextSibling;
      else this.window.insertBefore(element, cursor);
    }
    this.rendered = next;
  }

  private row(line: Line, current: boolean): HTMLElement {
    const row = document.createElement('div');
    const kind = ['out', 'err', 'gap', 'exit', 'restart'][line.kind];
    row.className = `row ${kind}${line.binary ? ' bin' : ''}${current ? ' current' : ''}`;
    row.dataset.n = String(line.n);
    row.dataset.seq = String(line.seq);
    const gutter = document.createElement('span');
    gutter.className = 'gutter';
    gutter.textContent = line.no === 0 ? '' : String(line.no);
    const text = document.createElement('span');
    text.className = 'text';
    let shown = visibleText(line.text);
    let cut = 0;
    if (shown.length > MAX_SHOWN) {
      cut = shown.length - MAX_SHOWN;
      shown = shown.slice(0, MAX_SHOWN);
    }
    if (shown.includes('\x1b')) text.innerHTML = ansiHtml(shown);
    else setText(text, shown, line.binary);
    if (this.highlight && line.kind < Kind.Exit) markMatches(text, this.highlight);
    if (cut > 0) {
      const more = document.createElement('span');
      more.className = 'cut';
      more.textContent = ` … ${cut.toLocaleString()} more characters (in the download)`;
      text.append(more);
    }
    row.append(gutter, text);
    return row;
  }
}
