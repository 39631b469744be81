// What the address holds, so that a link shows the same thing: capsule, process (tag or PID),
// filter text, regex, case, filter or highlight, wrap. The key never goes in the address.

export interface PageState {
  capsule: string;
  process: string;
  query: string;
  regex: boolean;
  caseSensitive: boolean;
  /** hide: only matching lines; mark: every line, matches highlighted. */
  mode: 'hide' | 'mark';
  wrap: boolean;
}

export function readState(search: string = window.location.search): PageState {
  const params = new URLSearchParams(search);
  return {
    capsule: params.get('capsule') ?? '',
    process: params.get('process') ?? '',
    query: params.get('q') ?? '',
    regex: params.get('re') === '1',
    caseSensitive: params.get('case') === '1',
    mode: params.get('mode') === 'mark' ? 'mark' : 'hide',
    wrap: params.get('wrap') === '1',
  };
}

export function writeState(state: PageState): void {
  const params = new URLSearchParams();
  if (state.capsule) params.set('capsule', state.capsule);
  if (state.process) params.set('process', state.process);
  if (state.query) params.set('q', state.query);
  if (state.regex) params.set('re', '1');
  if (state.caseSensitive) params.set('case', '1');
  if (state.mode === 'mark') params.set('mode', 'mark');
  if (state.wrap) params.set('wrap', '1');
  const search = params.toString();
  const url = `${window.location.pathname}${search ? `?${search}` : ''}`;
  if (url !== `${window.location.pathname}${window.location.search}`) window.history.replaceState(null, '', url);
}

export interface Filter {
  matcher: ((plain: string) => boolean) | null;
  highlight: RegExp | null;
  error: string | null;
}

const escapeRegExp = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

export function buildFilter(query: string, regex: boolean, caseSensitive: boolean): Filter {
  if (!query) return { matcher: null, highlight: null, error: null };
  let highlight: RegExp;
  try {
    highlight = new RegExp(regex ? query : escapeRegExp(query), caseSensitive ? 'gu' : 'giu');
  } catch (error) {
    return { matcher: null, highlight: null, error: error instanceof Error ? error.message : String(error) };
  }
  if (!regex) {
    const lower = query.toLowerCase();
    const matcher = caseSensitive
      ? (plain: string) => plain.includes(query)
      : (plain: string) => plain.toLowerCase().includes(lower);
    return { matcher, highlight, error: null };
  }
  const test = new RegExp(highlight.source, caseSensitive ? 'u' : 'iu');
  return { matcher: (plain: string) => test.test(plain), highlight, error: null };
}

const KEY = 'capsule.viewer.apiKey';
const CAP = 'capsule.viewer.lineCap';
export const DEFAULT_CAP = 200_000;

export const storedKey = (): string | null => sessionStorage.getItem(KEY);
export const storeKey = (key: string | null): void =>
  key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY);

export function storedCap(): number {
  const value = Number(localStorage.getItem(CAP));
  return Number.isInteger(value) && value >= 100 ? value : DEFAULT_CAP;
}

export const storeCap = (cap: number): void => localStorage.setItem(CAP, String(cap));
