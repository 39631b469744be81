// The GraphQL side: queries and mutations over HTTP POST, subscriptions over one graphql-ws
// (graphql-transport-ws) connection, all with the page's API key. The operations are the documents
// in the repository's graphql/ folder, bundled as text, with the fragments they spread appended.
import { type Client, createClient } from 'graphql-ws';

import capsulesDocument from '../../../graphql/Capsules.graphql?raw';
import processEventsDocument from '../../../graphql/ProcessEvents.graphql?raw';
import processOutputDocument from '../../../graphql/ProcessOutput.graphql?raw';
import processesDocument from '../../../graphql/Processes.graphql?raw';
import resizeTerminalDocument from '../../../graphql/ResizeTerminal.graphql?raw';
import sendInputDocument from '../../../graphql/SendInput.graphql?raw';
import signalProcessDocument from '../../../graphql/SignalProcess.graphql?raw';
import stopProcessDocument from '../../../graphql/StopProcess.graphql?raw';

const fragments = import.meta.glob<string>('../../../graphql/fragments/*.graphql', {
  query: '?raw',
  import: 'default',
  eager: true,
});

function withFragments(text: string): string {
  for (const [path, body] of Object.entries(fragments)) {
    const name = path.slice(path.lastIndexOf('/') + 1).replace(/\.graphql$/, '');
    if (text.includes(`...${name}`)) text += `\n${body}`;
  }
  return text;
}

export const DOCUMENTS = {
  capsules: withFragments(capsulesDocument),
  processes: withFragments(processesDocument),
  processEvents: withFragments(processEventsDocument),
  processOutput: withFragments(processOutputDocument),
  resizeTerminal: withFragments(resizeTerminalDocument),
  sendInput: withFragments(sendInputDocument),
  signalProcess: withFragments(signalProcessDocument),
  stopProcess: withFragments(stopProcessDocument),
};

/** The code the server closes a socket with when connection_init carries no valid key. */
export const FORBIDDEN = 4403;
// A ping unanswered this long means the connection is dead though no close came (a lost network).
const PING_EVERY_MS = 10_000;
const PONG_WITHIN_MS = 5_000;

export interface Capsule {
  id: string;
  status: string;
  hostId: string | null;
  createdAt: string;
  runtime: string;
  network: boolean;
}

export interface Process {
  capsuleId: string;
  pid: number;
  tag: string;
  cmd: string;
  args: string[];
  status: 'RUNNING' | 'EXITED';
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  startedAt: string;
  endedAt: string | null;
  /** On a pseudo-terminal: shown in a terminal, keys typed go to it. */
  terminal: boolean;
}

export interface ProcessEvent {
  kind: 'STARTED' | 'EXITED' | 'READY' | 'RESTARTED';
  process: Process;
}

export type OutputEvent =
  | { __typename: 'OutputChunk'; seq: number; stream: 'STDOUT' | 'STDERR'; data: string; encoding: 'UTF8' | 'BASE64' }
  | { __typename: 'OutputGap'; seq: number; lostEvents: number; lostBytes: number }
  | {
      __typename: 'ProcessRestarted';
      seq: number;
      pid: number;
      restarts: number;
      exitCode: number | null;
      signal: string | null;
      oomKilled: boolean;
    }
  | {
      __typename: 'ProcessExited';
      seq: number;
      exitCode: number | null;
      signal: string | null;
      timedOut: boolean;
      endedAt: string;
      oomKilled: boolean;
    };

interface GraphQLErrorShape {
  message: string;
  extensions?: { code?: string; retryAfterSec?: number };
}

/** A GraphQL error with the code the server gave it (extensions.code). */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly code: string | undefined,
    readonly retryAfterSec?: number,
  ) {
    super(message);
  }

  static from(errors: readonly GraphQLErrorShape[]): ApiError {
    const first = errors[0];
    return new ApiError(
      errors.map((error) => error.message).join('; '),
      first?.extensions?.code,
      first?.extensions?.retryAfterSec,
    );
  }
}

export type ConnectionListener = (connected: boolean) => void;

export class Api {
  readonly client: Client;
  private connected = false;
  private readonly listeners = new Set<ConnectionListener>();

  constructor(
    readonly httpUrl: string,
    private readonly key: string,
  ) {
    let socket: WebSocket | null = null;
    let pongTimer: ReturnType<typeof setTimeout> | undefined;
    this.client = createClient({
      url: httpUrl.replace(/^http/, 'ws'),
      connectionParams: { Authorization: `Bearer ${key}` },
      lazy: true,
      // The callers resubscribe themselves, each from the seq it has seen: graphql-ws's own retry
      // would repeat the first variables.
      retryAttempts: 0,
      keepAlive: PING_EVERY_MS,
      on: {
        opened: (opened) => {
          socket = opened as WebSocket;
        },
        connected: () => this.setConnected(true),
        closed: () => {
          socket = null;
          clearTimeout(pongTimer);
          this.setConnected(false);
        },
        ping: (received) => {
          if (received) return;
          pongTimer = setTimeout(() => socket?.close(4408, 'no pong'), PONG_WITHIN_MS);
        },
        pong: (received) => {
          if (received) clearTimeout(pongTimer);
        },
      },
    });
  }

  get isConnected(): boolean {
    return this.connected;
  }

  onConnection(listener: ConnectionListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private setConnected(connected: boolean): void {
    this.connected = connected;
    for (const listener of this.listeners) listener(connected);
  }

  async request<T>(query: string, variables: Record<string, unknown> = {}): Promise<T> {
    let response: Response;
    try {
      response = await fetch(this.httpUrl, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${this.key}` },
        body: JSON.stringify({ query, variables }),
      });
    } catch {
      throw new ApiError(`cannot reach ${this.httpUrl}`, 'NETWORK');
    }
    let body: { data?: T | null; errors?: GraphQLErrorShape[] };
    try {
      body = await response.json();
    } catch {
      throw new ApiError(`${this.httpUrl} answered HTTP ${response.status}`, 'NETWORK');
    }
    if (body.errors?.length) throw ApiError.from(body.errors);
    if (body.data == null) throw new ApiError(`${this.httpUrl} answered no data`, 'NETWORK');
    return body.data;
  }

  dispose(): void {
    void this.client.dispose();
  }
}
