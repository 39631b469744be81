// The page: key, capsules, a capsule's processes (live through processEvents), and the chosen
// process's output (live through processOutput) with its toolbar and status line.
import { useCallback, useEffect, useMemo, useReducer, useRef, useState } from 'preact/hooks';

import { Api, ApiError, type Capsule, DOCUMENTS, type Process, type ProcessEvent } from './api';
import { type LinkState, resumable } from './resumable';
import { OutputSession } from './session';
import { TerminalSession } from './terminal';
import {
  buildFilter,
  DEFAULT_CAP,
  type PageState,
  readState,
  storeCap,
  storedCap,
  storedKey,
  storeKey,
  writeState,
} from './state';

// signalProcess sends these (the contract's first nine).
const SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP', 'SIGQUIT', 'SIGKILL', 'SIGUSR1', 'SIGUSR2', 'SIGSTOP', 'SIGCONT'];

export interface Config {
  graphqlPath: string;
  devKey: string | null;
}

interface Toast {
  id: number;
  text: string;
  bad: boolean;
}

function time(value: string | null): string {
  return value ? new Date(value).toLocaleTimeString() : '';
}

function exitSummary(process: Process): string {
  if (process.status === 'RUNNING') return 'running';
  if (process.signal) return process.signal;
  return `exit ${process.exitCode ?? '?'}`;
}

function statusClass(process: Process): string {
  if (process.status === 'RUNNING') return 'running';
  return process.exitCode === 0 && !process.signal ? 'ok' : 'bad';
}

function commandLine(process: Process): string {
  return [process.cmd, ...process.args].join(' ');
}

/** The process a selector names: all digits a PID, else a tag (the running one first, then the newest). */
function resolve(processes: Process[], selector: string): Process | undefined {
  if (/^\d+$/.test(selector)) return processes.find((process) => String(process.pid) === selector);
  const tagged = processes.filter((process) => process.tag === selector);
  return tagged.find((process) => process.status === 'RUNNING') ?? tagged.sort((a, b) => b.startedAt.localeCompare(a.startedAt))[0];
}

function linkText(link: LinkState, detached: boolean, now: number): { text: string; kind: string } {
  if (detached) return { text: 'paused at the line cap', kind: 'paused' };
  switch (link.kind) {
    case 'connecting':
      return { text: 'connecting…', kind: 'connecting' };
    case 'live':
      return { text: 'live', kind: 'live' };
    case 'retrying': {
      const seconds = Math.max(0, Math.ceil((link.at - now) / 1000));
      return { text: `reconnecting in ${seconds}s (attempt ${link.attempt}): ${link.reason}`, kind: 'retrying' };
    }
    case 'done':
      return { text: 'ended', kind: 'done' };
    case 'failed':
      return { text: link.message, kind: 'failed' };
  }
}

function KeyDialog(props: { error: string | null; onKey: (key: string) => void }) {
  const [value, setValue] = useState('');
  return (
    <div class="overlay">
      <form
        class="dialog"
        onSubmit={(event) => {
          event.preventDefault();
          if (value.trim()) props.onKey(value.trim());
        }}
      >
        <h1>capsule logs</h1>
        <label for="api-key">API key</label>
        <input
          id="api-key"
          type="password"
          autocomplete="off"
          spellcheck={false}
          value={value}
          onInput={(event) => setValue(event.currentTarget.value)}
          autoFocus
        />
        {props.error && <p class="error">{props.error}</p>}
        <p class="hint">
          <code>capsule serve</code> prints the development key and writes it to <code>.capsule/dev-api-key</code>;{' '}
          <code>capsule keys create --team NAME</code> makes one. It is kept in this tab's session storage only.
        </p>
        <button type="submit" class="primary">
          Connect
        </button>
      </form>
    </div>
  );
}

export function App({ config }: { config: Config }) {
  const [key, setKey] = useState<string | null>(() => storedKey() ?? config.devKey);
  const [keyError, setKeyError] = useState<string | null>(null);
  const [page, setPage] = useState<PageState>(readState);
  const [toasts, setToasts] = useState<Toast[]>([]);
  const [cap, setCap] = useState(storedCap);

  const api = useMemo(() => (key ? new Api(`${window.location.origin}${config.graphqlPath}`, key) : null), [key]);
  useEffect(() => () => api?.dispose(), [api]);

  const update = useCallback((change: Partial<PageState>) => setPage((old) => ({ ...old, ...change })), []);
  useEffect(() => writeState(page), [page]);

  const toast = useCallback((text: string, bad = false) => {
    const id = Date.now() + Math.random();
    setToasts((old) => [...old.slice(-3), { id, text, bad }]);
    setTimeout(() => setToasts((old) => old.filter((item) => item.id !== id)), bad ? 8000 : 4000);
  }, []);

  const refused = useCallback((message: string) => {
    storeKey(null);
    setKeyError(message);
    setKey(null);
  }, []);

  // Capsules: on start, on demand, and every 15 s while the tab is shown.
  const [capsules, setCapsules] = useState<Capsule[] | null>(null);
  const loadCapsules = useCallback(async () => {
    if (!api) return;
    try {
      const data = await api.request<{ capsules: Capsule[] }>(DOCUMENTS.capsules);
      storeKey(key);
      setCapsules(data.capsules);
    } catch (error) {
      if (error instanceof ApiError && error.code === 'UNAUTHENTICATED') refused(error.message);
      else toast(`capsules: ${error instanceof Error ? error.message : String(error)}`, true);
    }
  }, [api]);
  useEffect(() => {
    setCapsules(null);
    void loadCapsules();
    const timer = setInterval(() => document.visibilityState === 'visible' && loadCapsules(), 15_000);
    return () => clearInterval(timer);
  }, [loadCapsules]);

  // The chosen capsule's processes: listed, then kept current by processEvents (listed again
  // whenever that subscription (re)connects, for what happened while it was away).
  const [processes, setProcesses] = useState<Process[] | null>(null);
  const [eventsLink, setEventsLink] = useState<LinkState>({ kind: 'connecting' });
  useEffect(() => {
    setProcesses(null);
    if (!api || !page.capsule) return;
    let active = true;
    const merge = (incoming: Process[]) =>
      setProcesses((old) => {
        const byPid = new Map((old ?? []).map((process) => [process.pid, process]));
        for (const process of incoming) {
          const known = byPid.get(process.pid);
          // An exit is final: a late list (or a replayed STARTED) never brings a process back to life.
          if (!known || known.status !== 'EXITED' || process.status === 'EXITED') byPid.set(process.pid, process);
        }
        return [...byPid.values()].sort(
          (a, b) => (a.status === b.status ? b.startedAt.localeCompare(a.startedAt) : a.status === 'RUNNING' ? -1 : 1),
        );
      });
    const list = async () => {
      try {
        const data = await api.request<{ processes: Process[] }>(DOCUMENTS.processes, { capsuleId: page.capsule });
        if (active) merge(data.processes);
      } catch (error) {
        if (!active) return;
        if (error instanceof ApiError && error.code === 'UNAUTHENTICATED') refused(error.message);
        else {
          setProcesses((old) => old ?? []);
          toast(`processes: ${error instanceof Error ? error.message : String(error)}`, true);
        }
      }
    };
    const stop = resumable<{ processEvents: ProcessEvent }>({
      api,
      query: DOCUMENTS.processEvents,
      variables: () => ({ capsuleId: page.capsule }),
      onData: ({ processEvents }) => merge([processEvents.process]),
      onState: (state) => {
        if (!active) return;
        setEventsLink(state);
        if (state.kind === 'live') void list();
        if (state.kind === 'failed' && state.code === 'UNAUTHENTICATED') refused(state.message);
      },
    });
    void list();
    return () => {
      active = false;
      stop();
    };
  }, [api, page.capsule]);

  const selected = processes && page.process ? resolve(processes, page.process) : undefined;

  if (!api) return <KeyDialog error={keyError} onKey={(value) => (setKeyError(null), setKey(value))} />;

  return (
    <div class="app">
      <header class="top">
        <span class="brand">
          capsule <b>logs</b>
        </span>
        <span class="grow" />
        <a class="link" href={config.graphqlPath}>
          GraphiQL
        </a>
        <button
          type="button"
          class="ghost"
          title="Forget this tab's API key and enter another"
          onClick={() => refused('enter an API key')}
        >
          Key…
        </button>
      </header>
      <div class="body">
        <aside class="sidebar">
          <section>
            <h2>
              Capsules
              <button type="button" class="ghost small" title="List the capsules again" onClick={() => void loadCapsules()}>
                ↻
              </button>
            </h2>
            {capsules === null && <p class="muted">loading…</p>}
            {capsules?.length === 0 && <p class="muted">no capsules yet: createCapsule makes one</p>}
            <ul class="list" data-testid="capsules">
              {capsules?.map((capsule) => (
                <li key={capsule.id}>
                  <button
                    type="button"
                    class={`item${capsule.id === page.capsule ? ' selected' : ''}`}
                    onClick={() => update({ capsule: capsule.id, process: '' })}
                  >
                    <span class={`dot ${capsule.status.toLowerCase()}`} title={capsule.status} />
                    <span class="mono ellipsis">{capsule.id}</span>
                    <span class="muted small">{capsule.runtime.toLowerCase()}</span>
                  </button>
                </li>
              ))}
            </ul>
          </section>
          {page.capsule && (
            <section class="processes">
              <h2>
                Processes
                <span class={`dot ${eventsLink.kind}`} title={`processEvents: ${linkText(eventsLink, false, Date.now()).text}`} />
              </h2>
              {processes === null && <p class="muted">loading…</p>}
              {processes?.length === 0 && <p class="muted">none yet: startProcess starts one</p>}
              <ul class="list" data-testid="processes">
                {processes?.map((process) => (
                  <li key={process.pid}>
                    <button
                      type="button"
                      class={`item process${selected?.pid === process.pid ? ' selected' : ''}`}
                      data-pid={process.pid}
                      onClick={() => update({ process: process.tag || String(process.pid) })}
                    >
                      <span class="line1">
                        <b class="ellipsis">{process.tag || `pid ${process.pid}`}</b>
                        <span class={`chip ${statusClass(process)}`}>{exitSummary(process)}</span>
                      </span>
                      <span class="line2 mono ellipsis" title={commandLine(process)}>
                        {process.pid} · {commandLine(process)}
                      </span>
                      <span class="line2 muted small">
                        {time(process.startedAt)}
                        {process.endedAt && ` → ${time(process.endedAt)}`}
                        {process.timedOut && ' · timed out'}
                      </span>
                    </button>
                  </li>
                ))}
              </ul>
            </section>
          )}
        </aside>
        <main class="pane">
          {page.capsule && page.process && processes !== null && selected?.terminal ? (
            <TerminalPane
              key={`${page.capsule}|${selected.tag}|${selected.startedAt}`}
              api={api}
              capsuleId={page.capsule}
              // By tag: a restart gives the process a new PID, not a new terminal session.
              selector={selected.tag}
              process={selected}
              toast={toast}
            />
          ) : page.capsule && page.process && processes !== null ? (
            <OutputPane
              key={`${page.capsule}|${selected?.pid ?? page.process}`}
              api={api}
              capsuleId={page.capsule}
              selector={selected ? String(selected.pid) : page.process}
              process={selected}
              page={page}
              update={update}
              cap={cap}
              setCap={(value) => (storeCap(value), setCap(value))}
              toast={toast}
            />
          ) : (
            <div class="empty">
              <p>{page.capsule ? 'Choose a process to follow its output.' : 'Choose a capsule.'}</p>
              <p class="muted small">
                Keys: <kbd>/</kbd> filter · <kbd>n</kbd>/<kbd>N</kbd> next/previous match · <kbd>f</kbd> follow ·{' '}
                <kbd>w</kbd> wrap · <kbd>Esc</kbd> clear the filter
              </p>
            </div>
          )}
        </main>
      </div>
      <div class="toasts" aria-live="polite">
        {toasts.map((item) => (
          <div key={item.id} class={`toast${item.bad ? ' bad' : ''}`}>
            {item.text}
          </div>
        ))}
      </div>
    </div>
  );
}

interface PaneProps {
  api: Api;
  capsuleId: string;
  selector: string;
  process: Process | undefined;
  page: PageState;
  update: (change: Partial<PageState>) => void;
  cap: number;
  setCap: (cap: number) => void;
  toast: (text: string, bad?: boolean) => void;
}

function download(name: string, text: string): void {
  const url = URL.createObjectURL(new Blob([text], { type: 'text/plain;charset=utf-8' }));
  const anchor = document.createElement('a');
  anchor.href = url;
  anchor.download = name;
  anchor.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function OutputPane(props: PaneProps) {
  const { api, capsuleId, selector, process, page, update, toast } = props;
  const box = useRef<HTMLDivElement>(null);
  const filterInput = useRef<HTMLInputElement>(null);
  const [session, setSession] = useState<OutputSession | null>(null);
  const [, tick] = useReducer((n: number) => n + 1, 0);
  const [matchIndex, setMatchIndex] = useState(-1);
  const filter = useMemo(() => buildFilter(page.query, page.regex, page.caseSensitive), [page.query, page.regex, page.caseSensitive]);

  useEffect(() => {
    let pending = 0;
    const created = new OutputSession({
      api,
      capsuleId,
      selector,
      cap: props.cap,
      parent: box.current!,
      // At most one re-render of the chrome per frame, however fast output comes.
      onChange: () => {
        if (pending === 0) pending = requestAnimationFrame(() => ((pending = 0), tick(0)));
      },
    });
    setSession(created);
    (window as unknown as { capsuleViewer: OutputSession }).capsuleViewer = created; // for the browser tests
    return () => {
      cancelAnimationFrame(pending);
      created.destroy();
    };
  }, [api, capsuleId, selector]);

  useEffect(() => {
    if (!session) return;
    session.setMatcher(filter.matcher);
    session.view.setFilter(page.mode === 'hide' && filter.matcher !== null, filter.highlight);
    setMatchIndex(-1);
  }, [session, filter, page.mode]);
  useEffect(() => session?.view.setWrap(page.wrap), [session, page.wrap]);
  useEffect(() => session?.setCap(props.cap), [session, props.cap]);

  // A second tick redraws the countdown while reconnecting.
  useEffect(() => {
    if (session?.link.kind !== 'retrying') return;
    const timer = setInterval(() => tick(0), 500);
    return () => clearInterval(timer);
  }, [session?.link.kind]);

  const gotoMatch = (step: 1 | -1) => session && setMatchIndex(session.view.gotoMatch(step));

  useEffect(() => {
    const onKey = (event: KeyboardEvent) => {
      const target = event.target as HTMLElement;
      if (target.closest('input, select, textarea') || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.key === '/') {
        event.preventDefault();
        filterInput.current?.focus();
        filterInput.current?.select();
      } else if (event.key === 'f' || event.key === 'End') {
        session?.jumpToLatest();
      } else if (event.key === 'w') {
        update({ wrap: !page.wrap });
      } else if (event.key === 'n' || event.key === 'N') {
        gotoMatch(event.key === 'n' ? 1 : -1);
      } else return;
      event.preventDefault();
    };
    window.addEventListener('keydown', onKey);
    return () => window.removeEventListener('keydown', onKey);
  });

  const saveAs = (event: Event, keepAnsi: boolean) => {
    (event.currentTarget as HTMLElement).closest('details')?.removeAttribute('open');
    if (!session) return;
    const model = session.model;
    const hidden = page.mode === 'hide' && filter.matcher !== null;
    const lines = hidden ? model.matches : Array.from({ length: model.lines.length }, (_, i) => model.base + i);
    const name = `${capsuleId}-${process?.tag || selector}${hidden ? '-filtered' : ''}.log`;
    download(name, model.text(lines, keepAnsi));
  };

  const model = session?.model;
  const link = session ? linkText(session.link, session.detached, Date.now()) : { text: '', kind: 'connecting' };
  const total = model?.lines.length ?? 0;
  const matches = model?.matches.length ?? 0;

  return (
    <div class="output">
      <ProcessBar api={api} capsuleId={capsuleId} selector={selector} process={process} toast={toast} />
      <div class="toolbar filters">
        <div class={`search${filter.error ? ' invalid' : ''}`}>
          <input
            ref={filterInput}
            type="search"
            placeholder="Filter  ( / )"
            aria-label="Filter"
            spellcheck={false}
            value={page.query}
            onInput={(event) => update({ query: event.currentTarget.value })}
            onKeyDown={(event) => {
              if (event.key === 'Enter') gotoMatch(event.shiftKey ? -1 : 1);
              else if (event.key === 'Escape') {
                update({ query: '' });
                event.currentTarget.blur();
              }
            }}
          />
          <button
            type="button"
            class={`toggle${page.regex ? ' on' : ''}`}
            title="Regular expression"
            aria-pressed={page.regex}
            onClick={() => update({ regex: !page.regex })}
          >
            .*
          </button>
          <button
            type="button"
            class={`toggle${page.caseSensitive ? ' on' : ''}`}
            title="Match case"
            aria-pressed={page.caseSensitive}
            onClick={() => update({ caseSensitive: !page.caseSensitive })}
          >
            Aa
          </button>
        </div>
        <div class="segmented" role="group" aria-label="Filter mode">
          <button type="button" class={page.mode === 'hide' ? 'on' : ''} onClick={() => update({ mode: 'hide' })}>
            Only matches
          </button>
          <button type="button" class={page.mode === 'mark' ? 'on' : ''} onClick={() => update({ mode: 'mark' })}>
            Highlight
          </button>
        </div>
        <span class="count" data-testid="match-count">
          {filter.error
            ? `invalid: ${filter.error}`
            : filter.matcher
              ? `${matchIndex >= 0 ? `${(matchIndex + 1).toLocaleString()} of ` : ''}${matches.toLocaleString()} matching of ${total.toLocaleString()} lines`
              : ''}
        </span>
        {filter.matcher && (
          <span class="nav">
            <button type="button" class="small" title="Previous match (N, Shift+Enter)" onClick={() => gotoMatch(-1)}>
              ↑
            </button>
            <button type="button" class="small" title="Next match (n, Enter)" onClick={() => gotoMatch(1)}>
              ↓
            </button>
          </span>
        )}
        <span class="grow" />
        <label class="check" title="Wrap long lines (w)">
          <input type="checkbox" checked={page.wrap} onChange={(event) => update({ wrap: event.currentTarget.checked })} />
          Wrap
        </label>
        <details class="menu">
          <summary>Download</summary>
          <div class="menu-items">
            <button type="button" onClick={(event) => saveAs(event, false)}>
              Text, ANSI stripped
            </button>
            <button type="button" onClick={(event) => saveAs(event, true)}>
              Text, ANSI kept
            </button>
          </div>
        </details>
        <details class="menu">
          <summary title="Settings">⚙</summary>
          <div class="menu-items">
            <label>
              Keep at most
              <input
                type="number"
                min={100}
                step={1000}
                value={props.cap}
                aria-label="Line cap"
                onChange={(event) => {
                  const value = Math.floor(Number(event.currentTarget.value));
                  if (value >= 100) props.setCap(value);
                }}
              />
              lines
            </label>
            <button type="button" onClick={() => props.setCap(DEFAULT_CAP)}>
              Reset to {DEFAULT_CAP.toLocaleString()}
            </button>
          </div>
        </details>
      </div>
      {session?.hasEarlier && (
        <div class="banner" data-testid="earlier">
          {model!.base > 0
            ? `${model!.base.toLocaleString()} earlier lines not kept (at most ${props.cap.toLocaleString()} are).`
            : `Showing output from seq ${model!.startSeq.toLocaleString()}.`}
          <button type="button" class="small" onClick={() => session.loadEarlier()}>
            Load earlier
          </button>
        </div>
      )}
      <div class="logbox" ref={box}>
        {session && (!session.view.following || session.detached) && (
          <button type="button" class="jump" data-testid="jump" onClick={() => session.jumpToLatest()}>
            {session.detached
              ? `Paused at ${props.cap.toLocaleString()} lines · jump to latest (f)`
              : session.newLines > 0
                ? `↓ ${session.newLines.toLocaleString()} new line${session.newLines === 1 ? '' : 's'} · follow (f)`
                : '↓ Follow (f)'}
          </button>
        )}
      </div>
      <footer class="status">
        <span class={`dot ${link.kind}`} />
        <span data-testid="link">{link.text}</span>
        <span class="grow" />
        <span data-testid="line-count">
          {total.toLocaleString()} line{total === 1 ? '' : 's'}
        </span>
        {model && model.lastSeq >= 0 && <span class="muted">seq {model.lastSeq.toLocaleString()}</span>}
        <span class="muted">{session?.view.following ? 'following' : 'paused'}</span>
      </footer>
    </div>
  );
}

interface BarProps {
  api: Api;
  capsuleId: string;
  selector: string;
  process: Process | undefined;
  toast: (text: string, bad?: boolean) => void;
}

/** The process's name, state and command, and what can be done to it: a signal, a stop. */
function ProcessBar({ api, capsuleId, selector, process, toast }: BarProps) {
  const [signal, setSignal] = useState('SIGTERM');
  const running = process?.status === 'RUNNING';
  const act = async (what: string, query: string, variables: Record<string, unknown>) => {
    try {
      await api.request(query, { capsuleId, selector, ...variables });
      toast(what);
    } catch (error) {
      toast(`${what} failed: ${error instanceof Error ? error.message : String(error)}`, true);
    }
  };
  return (
    <div class="toolbar">
      <div class="title">
        <b>{process?.tag || `pid ${process?.pid ?? selector}`}</b>
        {process && (
          <>
            <span class={`chip ${statusClass(process)}`}>{exitSummary(process)}</span>
            <span class="muted mono ellipsis" title={commandLine(process)}>
              PID {process.pid} · {commandLine(process)}
            </span>
            <span class="muted small nowrap">
              started {time(process.startedAt)}
              {process.endedAt && ` · ended ${time(process.endedAt)}`}
            </span>
          </>
        )}
      </div>
      <div class="actions">
        <select value={signal} onChange={(event) => setSignal(event.currentTarget.value)} title="Signal to send" disabled={!running}>
          {SIGNALS.map((name) => (
            <option key={name}>{name}</option>
          ))}
        </select>
        <button
          type="button"
          disabled={!running}
          onClick={() => act(`sent ${signal} to ${selector}`, DOCUMENTS.signalProcess, { signal })}
        >
          Send
        </button>
        <button
          type="button"
          class="danger"
          disabled={!running}
          title="SIGTERM, then SIGKILL after 10 s"
          onClick={() => act(`stopping ${selector}`, DOCUMENTS.stopProcess, {})}
        >
          Stop
        </button>
      </div>
    </div>
  );
}

interface TerminalPaneProps extends BarProps {
  process: Process;
}

/** A process on a pseudo-terminal: a terminal of the pane's size, which sends what is typed. */
function TerminalPane({ api, capsuleId, selector, process, toast }: TerminalPaneProps) {
  const box = useRef<HTMLDivElement>(null);
  const [session, setSession] = useState<TerminalSession | null>(null);
  const [, tick] = useReducer((n: number) => n + 1, 0);
  const running = useRef(process.status === 'RUNNING');
  running.current = process.status === 'RUNNING';

  useEffect(() => {
    let pending = 0;
    const created = new TerminalSession({
      api,
      capsuleId,
      selector,
      parent: box.current!,
      running: () => running.current,
      onChange: () => {
        if (pending === 0) pending = requestAnimationFrame(() => ((pending = 0), tick(0)));
      },
      onError: (text) => toast(text, true),
    });
    setSession(created);
    created.focus();
    (window as unknown as { capsuleTerminal: TerminalSession }).capsuleTerminal = created; // for the browser tests
    return () => {
      cancelAnimationFrame(pending);
      created.destroy();
    };
  }, [api, capsuleId, selector]);

  useEffect(() => {
    if (session?.link.kind !== 'retrying') return;
    const timer = setInterval(() => tick(0), 500);
    return () => clearInterval(timer);
  }, [session?.link.kind]);

  const link = session ? linkText(session.link, false, Date.now()) : { text: '', kind: 'connecting' };
  return (
    <div class="output">
      <ProcessBar api={api} capsuleId={capsuleId} selector={selector} process={process} toast={toast} />
      <div class="termbox" data-testid="terminal" onClick={() => session?.focus()}>
        <div class="termscreen" ref={box} />
      </div>
      <footer class="status">
        <span class={`dot ${link.kind}`} />
        <span data-testid="link">{link.text}</span>
        <span class="grow" />
        <span class="muted" data-testid="terminal-size" title="The size of the process's terminal">
          {session?.sentSize ? session.sentSize.replace('x', ' × ') : ''}
        </span>
        {session && session.lastSeq >= 0 && <span class="muted">seq {session.lastSeq.toLocaleString()}</span>}
        <span class="muted">terminal</span>
      </footer>
    </div>
  );
}
