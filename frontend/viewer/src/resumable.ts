// A subscription that outlives its connection: on a dropped socket (or a stream that ends without
// its last event) it waits with exponential backoff and subscribes again, asking for its variables
// anew, so a caller resumes from what it has seen (processOutput's fromSeq = last seq + 1).
import { Api, ApiError, FORBIDDEN } from './api';

export type LinkState =
  | { kind: 'connecting' }
  | { kind: 'live' }
  | { kind: 'retrying'; attempt: number; at: number; reason: string }
  | { kind: 'done' }
  | { kind: 'failed'; message: string; code?: string };

export interface ResumableOptions<T> {
  api: Api;
  query: string;
  /** Read before every (re)subscription. */
  variables: () => Record<string, unknown>;
  onData: (data: T) => void;
  onState: (state: LinkState) => void;
  /** True once the stream has said all it will (ProcessExited): its completion is then final. */
  isFinished?: () => boolean;
}

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 15_000;
// Codes that a retry cannot change: the operation itself is wrong or the key is refused.
const FINAL_CODES = new Set(['NOT_FOUND', 'INVALID_REQUEST', 'INVALID_STATE', 'UNAUTHENTICATED', 'FORBIDDEN']);

function describe(error: unknown): { message: string; code?: string; final: boolean; afterMs?: number } {
  if (Array.isArray(error)) error = ApiError.from(error);
  if (error instanceof ApiError) {
    const afterMs = error.retryAfterSec === undefined ? undefined : error.retryAfterSec * 1000;
    return { message: error.message, code: error.code, final: FINAL_CODES.has(error.code ?? ''), afterMs };
  }
  if (typeof error === 'object' && error !== null && 'code' in error && typeof error.code === 'number') {
    const { code, reason } = error as CloseEvent;
    if (code === FORBIDDEN) return { message: reason || 'the API key was refused', code: 'UNAUTHENTICATED', final: true };
    return { message: `connection closed (${code}${reason ? `: ${reason}` : ''})`, final: false };
  }
  if (error instanceof Event) return { message: 'cannot reach the server', final: false };
  return { message: error instanceof Error ? error.message : String(error), final: false };
}

/** Starts the subscription; the function returned ends it for good. */
export function resumable<T>(options: ResumableOptions<T>): () => void {
  const { api, query, onData, onState } = options;
  let stopped = false;
  let attempt = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let end: (() => void) | undefined;
  let stopListening: (() => void) | undefined;

  const retry = (reason: string, afterMs?: number) => {
    end = undefined;
    stopListening?.();
    if (stopped) return;
    attempt += 1;
    const backoff = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** (attempt - 1));
    const delay = afterMs ?? backoff * (0.75 + Math.random() / 2);
    onState({ kind: 'retrying', attempt, at: Date.now() + delay, reason });
    timer = setTimeout(start, delay);
  };

  const start = () => {
    if (stopped) return;
    onState({ kind: 'connecting' });
    let active = true;
    const live = () => {
      if (active && !stopped) {
        attempt = 0;
        onState({ kind: 'live' });
      }
    };
    stopListening = api.onConnection((connected) => connected && live());
    end = api.client.subscribe<T>(
      { query, variables: options.variables() },
      {
        next: (result) => {
          if (!active || stopped) return;
          if (result.errors?.length) {
            const error = ApiError.from(result.errors);
            active = false;
            end?.();
            const { message, code, final, afterMs } = describe(error);
            if (final) {
              stopListening?.();
              onState({ kind: 'failed', message, code });
            } else retry(message, afterMs);
            return;
          }
          if (result.data) onData(result.data as T);
        },
        error: (error) => {
          if (!active || stopped) return;
          active = false;
          const { message, code, final, afterMs } = describe(error);
          if (final) {
            stopListening?.();
            onState({ kind: 'failed', message, code });
          } else retry(message, afterMs);
        },
        complete: () => {
          if (!active || stopped) return;
          active = false;
          if (options.isFinished?.() ?? false) {
            stopListening?.();
            onState({ kind: 'done' });
          } else retry('the stream ended early');
        },
      },
    );
    if (api.isConnected) live();
  };

  start();
  return () => {
    stopped = true;
    clearTimeout(timer);
    stopListening?.();
    end?.();
  };
}
