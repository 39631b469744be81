// One process's output in the page: the log, the list that shows it, and the subscription that
// feeds it. Following, the log keeps the last `cap` lines; paused (scrolled up), it takes lines in
// until the cap and then lets go of the stream, to take it up again from the next seq on return.
import { type Api, DOCUMENTS, type OutputEvent } from './api';
import { LogView } from './logview';
import { OutputLog, SeqIndex } from './model';
import { type LinkState, resumable } from './resumable';

export interface SessionOptions {
  api: Api;
  capsuleId: string;
  selector: string;
  cap: number;
  parent: HTMLElement;
  onChange: () => void;
}

export class OutputSession {
  model: OutputLog;
  readonly view: LogView;
  link: LinkState = { kind: 'connecting' };
  /** Paused at the cap: the stream was let go of after `model.lastSeq`. */
  detached = false;
  private readonly index = new SeqIndex();
  private stop: (() => void) | undefined;
  private appendedAtPause = 0;

  constructor(private readonly options: SessionOptions) {
    this.model = new OutputLog(options.cap, 0, this.index);
    this.view = new LogView(options.parent, this.model, {
      onFollowChange: (following) => this.onFollowChange(following),
      onRender: options.onChange,
    });
    this.subscribe();
  }

  /** Lines that arrived since the view paused. */
  get newLines(): number {
    return this.view.following ? 0 : this.model.appended - this.appendedAtPause;
  }

  /** Whether output before the first line kept can be replayed. */
  get hasEarlier(): boolean {
    return this.model.base > 0 || this.model.startSeq > 0;
  }

  setCap(cap: number): void {
    this.model.cap = cap;
    if (this.view.following) this.model.trim();
    this.view.schedule();
  }

  /** Shows the output from about half a cap of lines before the first line kept, paused. */
  loadEarlier(): void {
    const first = this.model.lines[0]?.seq ?? this.model.startSeq;
    const from = this.index.before(first, Math.floor(this.model.cap / 2));
    this.restartFrom(from);
  }

  /** Back to the tail: the stream taken up again where it was let go of, and followed. */
  jumpToLatest(): void {
    this.view.jumpToLatest();
  }

  destroy(): void {
    this.stop?.();
    this.view.destroy();
  }

  private restartFrom(seq: number): void {
    this.stop?.();
    this.detached = false;
    this.model = new OutputLog(this.model.cap, seq, this.index);
    this.model.setMatcher(this.currentMatcher);
    this.view.setFollowing(false);
    this.appendedAtPause = 0;
    this.view.setModel(this.model);
    this.view.scroller.scrollTop = 0;
    this.subscribe();
    this.options.onChange();
  }

  private currentMatcher: OutputLog['matcher'] = null;

  setMatcher(matcher: OutputLog['matcher']): void {
    this.currentMatcher = matcher;
    this.model.setMatcher(matcher);
  }

  private onFollowChange(following: boolean): void {
    if (following) {
      this.model.trim();
      if (this.detached) {
        this.detached = false;
        this.subscribe();
      }
    } else {
      this.appendedAtPause = this.model.appended;
    }
    this.options.onChange();
  }

  private subscribe(): void {
    const { api, capsuleId, selector } = this.options;
    this.stop = resumable<{ processOutput: OutputEvent }>({
      api,
      query: DOCUMENTS.processOutput,
      variables: () => ({ capsuleId, selector, fromSeq: this.model.lastSeq + 1 }),
      isFinished: () => this.model.exited,
      onState: (state) => {
        this.link = state;
        this.options.onChange();
      },
      onData: ({ processOutput: event }) => this.take(event),
    });
  }

  private take(event: OutputEvent): void {
    if (this.detached) return;
    if (!this.view.following && this.model.lines.length >= this.model.cap) {
      // Paused and full: nothing is dropped from under the reader; the rest waits on the server.
      // Chunks are taken whole (a resume asks for seqs, not lines), so a paused log may pass the
      // cap by one chunk: a merged replay chunk holds at most 1 MiB.
      this.detached = true;
      this.stop?.();
      this.stop = undefined;
      this.link = { kind: 'done' };
      this.options.onChange();
      return;
    }
    if (!this.model.add(event)) return;
    if (this.view.following) this.model.trim();
    this.view.schedule();
  }
}
