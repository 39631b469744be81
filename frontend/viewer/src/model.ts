// A process's output as lines: chunks split on newlines per stream (a line may span chunks), seqs
// deduplicated, at most `cap` lines kept (the oldest dropped in batches), and the filter's matches
// kept in step as lines arrive.
import { decodeBase64, escapeBytes } from './bytes';
import type { OutputEvent } from './api';

export const enum Kind {
  Stdout = 0,
  Stderr = 1,
  Gap = 2,
  Exit = 3,
  Restart = 4,
}

export interface Line {
  /** The line's absolute number: its place in this log, counting dropped lines. */
  n: number;
  /** Its number among the output lines (notices have none: 0), as the gutter shows it. */
  no: number;
  /** The seq of the chunk the line began in. */
  seq: number;
  kind: Kind;
  text: string;
  /** Part of the line came as BASE64 (bytes shown escaped). */
  binary: boolean;
}

// CSI, OSC (ended by BEL or ST) and two-character escapes: what ansi_up consumes.
const ANSI = /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]/g;

/** The text without its ANSI escapes. */
export function stripAnsi(text: string): string {
  return text.includes('\x1b') ? text.replace(ANSI, '') : text;
}

/** What a terminal leaves of a line: the part after its last carriage return (a redrawn line). */
export function visibleText(text: string): string {
  if (!text.includes('\r')) return text;
  const trimmed = text.replace(/\r+$/, '');
  return trimmed.slice(trimmed.lastIndexOf('\r') + 1);
}

/** The searchable text of a line: what the row shows, escapes removed. */
export function plainText(line: Line): string {
  return stripAnsi(visibleText(line.text));
}

export type Matcher = (plain: string) => boolean;

/** Where earlier output is: a seq, every INDEX_EVERY lines of the first pass over the stream. */
export class SeqIndex {
  private readonly seqs: number[] = [];
  private readonly ordinals: number[] = [];
  private lines = 0;
  private highestSeq = -1;

  static readonly EVERY = 1000;

  /** Counts `count` lines beginning in chunk `seq`, the first time that chunk is seen. */
  add(seq: number, count: number): void {
    if (seq <= this.highestSeq || count === 0) return;
    this.highestSeq = seq;
    const before = this.lines;
    this.lines += count;
    if (this.seqs.length === 0 || Math.floor(before / SeqIndex.EVERY) !== Math.floor(this.lines / SeqIndex.EVERY)) {
      this.seqs.push(seq);
      this.ordinals.push(before);
    }
  }

  /** A seq about `lines` lines before `seq`, or 0. */
  before(seq: number, lines: number): number {
    const at = upperBound(this.seqs, seq) - 1;
    if (at < 0) return 0;
    const target = this.ordinals[at] - lines;
    const found = upperBound(this.ordinals, target) - 1;
    return found <= 0 ? 0 : this.seqs[found];
  }
}

/** The first index whose value is greater than `value` in a sorted array. */
export function upperBound(values: ArrayLike<number>, value: number): number {
  let low = 0;
  let high = values.length;
  while (low < high) {
    const mid = (low + high) >> 1;
    if (values[mid] <= value) low = mid + 1;
    else high = mid;
  }
  return low;
}

/** The first index whose value is at least `value` in a sorted array. */
export function lowerBound(values: ArrayLike<number>, value: number): number {
  let low = 0;
  let high = values.length;
  while (low < high) {
    const mid = (low + high) >> 1;
    if (values[mid] < value) low = mid + 1;
    else high = mid;
  }
  return low;
}

export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** How a run ended: its exit code, or the signal that killed it and why. */
function endText(event: { exitCode: number | null; signal: string | null; oomKilled: boolean }): string {
  if (event.oomKilled) return `was killed by ${event.signal ?? 'SIGKILL'} (out of memory)`;
  return event.signal !== null ? `was killed by ${event.signal}` : `exited with code ${event.exitCode ?? '?'}`;
}

function exitText(event: Extract<OutputEvent, { __typename: 'ProcessExited' }>): string {
  const why = event.timedOut ? ' (its lifetime ran out)' : '';
  return `process ${endText(event)}${why} at ${new Date(event.endedAt).toLocaleString()}`;
}

function restartText(event: Extract<OutputEvent, { __typename: 'ProcessRestarted' }>): string {
  return `process ${endText(event)}; restarted as pid ${event.pid} (restart ${event.restarts.toLocaleString()})`;
}

export interface Changes {
  /** Lines dropped from the front since the last take, and how many of them matched. */
  droppedLines: number;
  droppedMatches: number;
  /** The lowest absolute line number whose text changed or that was added; Infinity for none. */
  changedFrom: number;
  reset: boolean;
}

export class OutputLog {
  lines: Line[] = [];
  /** The absolute number of lines[0]: how many lines were dropped before it. */
  base = 0;
  lastSeq = -1;
  exited = false;
  /** Lines taken in, ever (for "N new lines" while paused). */
  appended = 0;
  /** The longest visible text, in characters, for the width of the unwrapped view. */
  longest = 0;
  matcher: Matcher | null = null;
  /** The absolute numbers of the lines the matcher accepts, ascending. */
  matches: number[] = [];
  private open: [Line | null, Line | null] = [null, null];
  private outputLines = 0;
  private changes: Changes = OutputLog.noChanges(true);

  constructor(
    public cap: number,
    /** The seq this log began at: 0, or later when replayed from the middle. */
    readonly startSeq: number,
    private readonly index: SeqIndex,
  ) {
    this.lastSeq = startSeq - 1;
  }

  private static noChanges(reset = false): Changes {
    return { droppedLines: 0, droppedMatches: 0, changedFrom: Infinity, reset };
  }

  get end(): number {
    return this.base + this.lines.length;
  }

  line(absolute: number): Line {
    return this.lines[absolute - this.base];
  }

  /** What changed since the last call. */
  takeChanges(): Changes {
    const changes = this.changes;
    this.changes = OutputLog.noChanges();
    return changes;
  }

  /** Takes one event in; false for a seq already seen (a resumed stream repeating itself). */
  add(event: OutputEvent): boolean {
    if (event.seq <= this.lastSeq) return false;
    switch (event.__typename) {
      case 'OutputChunk': {
        const text = event.encoding === 'BASE64' ? escapeBytes(decodeBase64(event.data)) : event.data;
        const begun = this.addText(event.seq, event.stream === 'STDERR' ? Kind.Stderr : Kind.Stdout, text, event.encoding === 'BASE64');
        this.index.add(event.seq, begun);
        break;
      }
      case 'OutputGap': {
        const bytes = formatBytes(event.lostBytes);
        const events = `${event.lostEvents.toLocaleString()} event${event.lostEvents === 1 ? '' : 's'}`;
        this.closeOpen();
        this.push({ seq: event.seq, kind: Kind.Gap, text: `${events} no longer retained (${bytes} of output)`, binary: false });
        // The gap's seq is the first one still there: the next chunk may carry it.
        this.lastSeq = Math.max(this.lastSeq, event.seq - 1);
        return true;
      }
      case 'ProcessRestarted':
        // The stream goes on with the next run's output, after a notice of how this one ended.
        this.closeOpen();
        this.push({ seq: event.seq, kind: Kind.Restart, text: restartText(event), binary: false });
        break;
      case 'ProcessExited':
        this.closeOpen();
        this.exited = true;
        this.push({ seq: event.seq, kind: Kind.Exit, text: exitText(event), binary: false });
        break;
    }
    this.lastSeq = event.seq;
    return true;
  }

  /** Lines as the text of a file: notices in brackets, escapes kept or not. */
  text(absolutes: Iterable<number>, keepAnsi: boolean): string {
    const out: string[] = [];
    for (const absolute of absolutes) {
      const line = this.line(absolute);
      if (line.kind >= Kind.Gap) out.push(`[${line.text}]`);
      else out.push(keepAnsi ? line.text : stripAnsi(line.text));
    }
    return out.length ? `${out.join('\n')}\n` : '';
  }

  setMatcher(matcher: Matcher | null): void {
    this.matcher = matcher;
    this.matches = [];
    if (matcher) {
      for (let i = 0; i < this.lines.length; i += 1) if (this.accepts(this.lines[i])) this.matches.push(this.base + i);
    }
    this.changes = OutputLog.noChanges(true);
  }

  /** Drops the oldest lines past the cap; a twentieth more, so that drops come in batches. */
  trim(): void {
    if (this.lines.length <= this.cap) return;
    const count = Math.min(this.lines.length, this.lines.length - this.cap + Math.floor(this.cap / 20));
    this.lines.splice(0, count);
    this.base += count;
    const matches = lowerBound(this.matches, this.base);
    this.matches.splice(0, matches);
    this.changes.droppedLines += count;
    this.changes.droppedMatches += matches;
  }

  private accepts(line: Line): boolean {
    return this.matcher !== null && line.kind < Kind.Exit && this.matcher(plainText(line));
  }

  private closeOpen(): void {
    this.open = [null, null];
  }

  /** Adds a chunk's text; returns how many lines began in it. */
  private addText(seq: number, kind: Kind.Stdout | Kind.Stderr, text: string, binary: boolean): number {
    const parts = text.split('\n');
    let begun = 0;
    const open = this.open[kind];
    let first = 0;
    if (open !== null) {
      this.extend(open, parts[0], binary);
      first = 1;
    }
    for (let i = first; i < parts.length; i += 1) {
      // After the last newline: an open line if any text follows it, else nothing yet.
      if (i === parts.length - 1 && parts[i] === '') {
        this.open[kind] = null;
        return begun;
      }
      this.open[kind] = this.push({ seq, kind, text: parts[i], binary });
      begun += 1;
    }
    return begun;
  }

  private extend(line: Line, text: string, binary: boolean): void {
    if (text === '') return;
    line.text += text;
    line.binary ||= binary;
    this.longest = Math.max(this.longest, line.text.length);
    const absolute = line.n;
    if (absolute < this.base) return; // dropped already
    this.changes.changedFrom = Math.min(this.changes.changedFrom, absolute);
    if (this.matcher === null) return;
    const at = lowerBound(this.matches, absolute);
    const listed = this.matches[at] === absolute;
    const accepted = this.accepts(line);
    if (accepted && !listed) this.matches.splice(at, 0, absolute);
    else if (!accepted && listed) this.matches.splice(at, 1);
  }

  private push(fields: Omit<Line, 'n' | 'no'>): Line {
    const absolute = this.end;
    const output = fields.kind === Kind.Stdout || fields.kind === Kind.Stderr;
    const line = { n: absolute, no: output ? ++this.outputLines : 0, ...fields };
    this.lines.push(line);
    this.appended += 1;
    this.longest = Math.max(this.longest, line.text.length);
    this.changes.changedFrom = Math.min(this.changes.changedFrom, absolute);
    if (this.accepts(line)) this.matches.push(absolute);
    return line;
  }
}
