// A process on a pseudo-terminal, in an xterm.js terminal: its output (one STDOUT stream of raw
// bytes, escape sequences and all) written as it comes, keys typed sent with sendInput, and the
// terminal's size, which follows its box through the fit add-on, given to resizeTerminal. The output
// resumes after a dropped connection from the last seq written plus one, and a seq already written
// is never written again, so a reconnect doubles nothing.
import '@xterm/xterm/css/xterm.css';

import { FitAddon } from '@xterm/addon-fit';
import { Terminal } from '@xterm/xterm';

import { type Api, DOCUMENTS, type OutputEvent } from './api';
import { decodeBase64 } from './bytes';
import { type LinkState, resumable } from './resumable';

export interface TerminalOptions {
  api: Api;
  capsuleId: string;
  selector: string;
  parent: HTMLElement;
  /** Whether the process still runs: keys and sizes go only to a running process. */
  running: () => boolean;
  onChange: () => void;
  onError: (text: string) => void;
}

// The window settles before its size is sent: a drag of its edge sends one resize, not hundreds.
const RESIZE_AFTER_MS = 120;

const dim = (text: string) => `\x1b[2m${text}\x1b[22m`;

function plural(count: number, what: string): string {
  return `${count.toLocaleString()} ${what}${count === 1 ? '' : 's'}`;
}

export class TerminalSession {
  readonly terminal: Terminal;
  link: LinkState = { kind: 'connecting' };
  /** The seq of the last event written; -1 before the first. */
  lastSeq = -1;
  exited = false;
  /** The size resizeTerminal was last given (cols x rows), for the status line. */
  sentSize = '';
  private readonly fit = new FitAddon();
  private readonly observer: ResizeObserver;
  private stop: (() => void) | undefined;
  private resizeTimer: ReturnType<typeof setTimeout> | undefined;
  // Keys go out one request at a time, in the order they were typed; those typed while one is on
  // its way go together in the next.
  private readonly keys: { data: string; encoding: 'UTF8' | 'BASE64' }[] = [];
  private sending = false;
  private destroyed = false;

  constructor(private readonly options: TerminalOptions) {
    this.terminal = new Terminal({
      cursorBlink: true,
      convertEol: false, // the terminal's line discipline already turned \n into \r\n
      scrollback: 10_000,
      fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace',
      fontSize: 13,
      theme: { background: '#0d1117', foreground: '#e6edf3', cursor: '#e6edf3' },
    });
    this.terminal.loadAddon(this.fit);
    this.terminal.open(options.parent);
    this.terminal.onData((data) => this.send(data, 'UTF8'));
    this.terminal.onBinary((data) => this.send(btoa(data), 'BASE64'));
    this.terminal.onResize(() => this.scheduleResize());
    this.observer = new ResizeObserver(() => this.refit());
    this.observer.observe(options.parent);
    this.refit();
    this.scheduleResize(0);
    this.subscribe();
  }

  focus(): void {
    this.terminal.focus();
  }

  /** The text of the terminal's lines, scrollback included (for the browser tests). */
  text(): string[] {
    const buffer = this.terminal.buffer.active;
    const lines: string[] = [];
    for (let i = 0; i < buffer.length; i += 1) lines.push(buffer.getLine(i)?.translateToString(true) ?? '');
    return lines;
  }

  /** The process's terminal takes the size of the page's again (after it ran, or was resized elsewhere). */
  resizeNow(): void {
    this.scheduleResize(0);
  }

  destroy(): void {
    this.destroyed = true;
    this.stop?.();
    clearTimeout(this.resizeTimer);
    this.observer.disconnect();
    this.terminal.dispose();
  }

  private refit(): void {
    const { clientWidth, clientHeight } = this.options.parent;
    if (this.destroyed || clientWidth === 0 || clientHeight === 0) return; // hidden: keep the size
    this.fit.fit();
  }

  private scheduleResize(afterMs = RESIZE_AFTER_MS): void {
    clearTimeout(this.resizeTimer);
    this.resizeTimer = setTimeout(() => void this.sendSize(), afterMs);
  }

  private async sendSize(): Promise<void> {
    const { cols, rows } = this.terminal;
    const size = `${cols}x${rows}`;
    if (this.destroyed || size === this.sentSize || !this.options.running()) return;
    const { api, capsuleId, selector } = this.options;
    try {
      await api.request(DOCUMENTS.resizeTerminal, { capsuleId, selector, cols, rows });
      this.sentSize = size;
      this.options.onChange();
    } catch (error) {
      if (!this.options.running()) return; // it exited meanwhile
      this.options.onError(`resizeTerminal: ${error instanceof Error ? error.message : String(error)}`);
    }
  }

  private send(data: string, encoding: 'UTF8' | 'BASE64'): void {
    if (this.exited || !this.options.running()) return;
    const last = this.keys[this.keys.length - 1];
    if (last && last.encoding === 'UTF8' && encoding === 'UTF8') last.data += data;
    else this.keys.push({ data, encoding });
    void this.flush();
  }

  private async flush(): Promise<void> {
    if (this.sending) return;
    this.sending = true;
    const { api, capsuleId, selector } = this.options;
    try {
      for (let next = this.keys.shift(); next && !this.destroyed; next = this.keys.shift()) {
        try {
          await api.request(DOCUMENTS.sendInput, { capsuleId, selector, ...next });
        } catch (error) {
          this.options.onError(`sendInput: ${error instanceof Error ? error.message : String(error)}`);
        }
      }
    } finally {
      this.sending = false;
    }
  }

  private subscribe(): void {
    const { api, capsuleId, selector } = this.options;
    this.stop = resumable<{ processOutput: OutputEvent }>({
      api,
      query: DOCUMENTS.processOutput,
      variables: () => ({ capsuleId, selector, fromSeq: this.lastSeq + 1 }),
      isFinished: () => this.exited,
      onState: (state) => {
        this.link = state;
        this.options.onChange();
      },
      onData: ({ processOutput: event }) => this.take(event),
    });
  }

  private take(event: OutputEvent): void {
    // A gap's seq is the first event kept after it, which is still to come.
    if (event.__typename === 'OutputGap') {
      if (event.seq <= this.lastSeq) return;
      const lost = `${plural(event.lostEvents, 'event')}, ${plural(event.lostBytes, 'byte')}`;
      this.terminal.write(`\r\n${dim(`[output before this was not kept: ${lost}]`)}\r\n`);
      this.lastSeq = event.seq - 1;
      return;
    }
    if (event.seq <= this.lastSeq) return; // written already, before a reconnect
    this.lastSeq = event.seq;
    if (event.__typename === 'OutputChunk') {
      this.terminal.write(event.encoding === 'BASE64' ? decodeBase64(event.data) : event.data);
      return;
    }
    if (event.__typename === 'ProcessRestarted') {
      // Its restart policy ran it again, on a new terminal: that one is given the page's size too.
      this.terminal.write(`\r\n${dim(`[restarted as pid ${event.pid}]`)}\r\n`);
      this.sentSize = '';
      this.scheduleResize(0);
      return;
    }
    if (event.__typename !== 'ProcessExited') return; // an event this page does not know
    this.exited = true;
    const oom = event.oomKilled ? ' (out of memory)' : '';
    const how = event.signal ? `ended by ${event.signal}${oom}` : `exited with code ${event.exitCode ?? '?'}`;
    const ended = `[process ${how}${event.timedOut ? ', its time ran out' : ''}]`;
    this.terminal.write(`\r\n${dim(ended)}\r\n\x1b[?25l`); // the cursor goes: nothing is typed any more
    this.options.onChange();
  }
}
