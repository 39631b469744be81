// The suite's load client, the same for `capsule serve` and for every peer.
//
//   node load.mjs MODE CONFIG_JSON
//
// Modes:
//   subscribe  `count` WebSockets at once, each with one subscription (graphql-transport-ws), or each
//              a plain WebSocket whose messages are lines (`raw`, websocketd's line mode).
//   exec       `count` GraphQL requests one after another; the time of each.
//   starts     `count` startProcess calls, `concurrency` at once, until a processEvents subscription
//              has seen each one's EXITED.
//   events     the same starts on `url`, with the processEvents subscription on `wsUrl` (another
//              replica): events per second, and each STARTED's and EXITED's delay from its `at`.
// Prints JSON lines on stdout: {"event":"live",...} once every subscriber has its first message (the
// caller then lets the writer go), and {"event":"result",...} at the end.
// Times come from process.hrtime (CLOCK_MONOTONIC), the clock the writers stamp their lines with.

import http from 'node:http';
import WebSocket from 'ws';

const [mode, configText] = process.argv.slice(2);
const config = JSON.parse(configText);

const nowNs = () => Number(process.hrtime.bigint());
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n');

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[index];
}

function summary(values) {
  const sorted = Float64Array.from(values).sort();
  return {
    count: sorted.length,
    p50: percentile(sorted, 0.5),
    p90: percentile(sorted, 0.9),
    p99: percentile(sorted, 0.99),
    max: sorted.length ? sorted[sorted.length - 1] : null,
  };
}

// Milliseconds from a line's stamp (monotonic ns) to `at`, for each whole line of `text`.
function stampDelays(subscriber, text, at, delays) {
  const joined = subscriber.partial + text;
  const lines = joined.split('\n');
  subscriber.partial = lines.pop();
  for (const line of lines) {
    if (line.length > 0 && line.charCodeAt(0) >= 48 && line.charCodeAt(0) <= 57) {
      const stamp = Number(line.split(' ', 1)[0]);
      if (Number.isFinite(stamp)) delays.push((at - stamp) / 1e6);
    }
  }
}

function countLines(text) {
  let lines = 0;
  for (let i = text.indexOf('\n'); i !== -1; i = text.indexOf('\n', i + 1)) lines++;
  return lines;
}

function subscribe() {
  // connectSec: how long subscribers may take to become live; drainSec: how long after that (or after
  // all are live, if sooner) the run may go on before it ends with what has arrived.
  const { url, count, raw = false, stamps = false, connectSec = 120, drainSec = 600 } = config;
  const started = nowNs();
  const delays = [];
  const errors = [];
  const subscribers = [];
  let live = 0;
  let finished = 0;
  let closing = false;
  let goAt = null;
  process.stdin.on('data', (text) => {
    if (goAt === null && String(text).includes('go')) goAt = nowNs();
  });

  const finish = (timedOut) => {
    if (closing) return;
    closing = true;
    const dones = subscribers.filter((s) => s.ok).map((s) => s.doneAt);
    const liveAts = subscribers.map((s) => s.liveAt).filter((t) => t !== null);
    emit({
      event: 'result',
      subscribers: count,
      live: liveAts.length,
      // completed: got to the end (ProcessExited, or raw, the close); dropped: ended before that.
      completed: dones.length,
      dropped: subscribers.filter((s) => s.doneAt !== null && !s.ok).length,
      timedOut,
      errors: errors.slice(0, 5),
      errorCount: errors.length,
      allLiveMs: liveAts.length === count ? (Math.max(...liveAts) - started) / 1e6 : null,
      // From "go" on stdin (the caller is about to let the writer go), else from the first message
      // (or, raw, the open: websocketd starts the command then) to the last subscriber's end.
      spanMs: dones.length && (goAt !== null || liveAts.length)
        ? (Math.max(...dones) - (goAt ?? Math.min(...liveAts))) / 1e6 : null,
      bytesMin: Math.min(...subscribers.map((s) => s.bytes)),
      bytesTotal: subscribers.reduce((sum, s) => sum + s.bytes, 0),
      linesMin: Math.min(...subscribers.map((s) => s.lines)),
      messages: subscribers.reduce((sum, s) => sum + s.messages, 0),
      gaps: subscribers.reduce((sum, s) => sum + s.gaps, 0),
      lostBytes: subscribers.reduce((sum, s) => sum + s.lostBytes, 0),
      delayMs: stamps ? summary(delays) : null,
    });
    for (const s of subscribers) s.ws.terminate();
    setTimeout(() => process.exit(0), 50);
  };

  let drainTimer = null;
  const drain = () => {
    if (drainTimer === null) drainTimer = setTimeout(() => finish(true), drainSec * 1000);
  };
  // "live" once every subscriber is live or has been dropped before it was.
  let deadBeforeLive = 0;
  let saidLive = false;
  const checkLive = (at) => {
    if (!saidLive && live + deadBeforeLive === count) {
      saidLive = true;
      emit({ event: 'live', ms: (at - started) / 1e6, live });
      drain();
    }
  };
  const markLive = (s, at) => {
    if (s.liveAt !== null) return;
    s.liveAt = at;
    live++;
    checkLive(at);
  };

  const markDone = (s, at, ok = true) => {
    if (s.doneAt !== null) return;
    s.doneAt = at;
    s.ok = ok;
    if (!ok && s.liveAt === null) {
      deadBeforeLive++;
      checkLive(at);
    }
    finished++;
    if (finished === count) finish(false);
  };

  const onData = (s, text, at) => {
    if (s.firstDataAt === null) s.firstDataAt = at;
    s.bytes += text.length;
    s.lines += countLines(text);
    if (stamps) stampDelays(s, text, at, delays);
  };

  for (let index = 0; index < count; index++) {
    const s = {
      ws: null, liveAt: null, firstDataAt: null, doneAt: null,
      bytes: 0, lines: 0, messages: 0, gaps: 0, lostBytes: 0, partial: '', seenFirst: false,
      ok: false, exited: false,
    };
    subscribers.push(s);
    const ws = raw
      ? new WebSocket(url)
      : new WebSocket(url, 'graphql-transport-ws', { maxPayload: 256 * 1024 * 1024 });
    s.ws = ws;
    ws.on('error', (error) => {
      errors.push(`subscriber ${index}: ${error.message}`);
      markDone(s, nowNs(), false);
    });
    ws.on('close', (code, reason) => {
      if (s.doneAt === null) {
        if (!raw) errors.push(`subscriber ${index}: closed ${code} ${reason}`);
        markDone(s, nowNs(), raw);
      }
    });
    if (raw) {
      // websocketd: the command starts when the socket opens; each message is one line of its output.
      ws.on('open', () => markLive(s, nowNs()));
      ws.on('message', (data) => {
        const at = nowNs();
        s.messages++;
        onData(s, data.toString() + '\n', at);
      });
      continue;
    }
    ws.on('open', () => {
      ws.send(JSON.stringify({ type: 'connection_init', payload: { Authorization: `Bearer ${config.key}` } }));
    });
    ws.on('message', (data) => {
      const at = nowNs();
      const message = JSON.parse(data);
      switch (message.type) {
        case 'connection_ack':
          ws.send(JSON.stringify({
            id: '1', type: 'subscribe', payload: { query: config.query, variables: config.variables },
          }));
          return;
        case 'ping':
          ws.send(JSON.stringify({ type: 'pong' }));
          return;
        case 'next': {
          s.messages++;
          if (message.payload.errors) {
            errors.push(`subscriber ${index}: ${JSON.stringify(message.payload.errors).slice(0, 300)}`);
            return;
          }
          const event = Object.values(message.payload.data)[0];
          markLive(s, at);
          if (!s.seenFirst) {
            // The writer's first line, written before it waits: it says the subscription is live.
            s.seenFirst = true;
            return;
          }
          if (event.__typename === 'OutputChunk') onData(s, event.data, at);
          else if (event.__typename === 'OutputGap') {
            s.gaps++;
            s.lostBytes += event.lostBytes;
          } else if (event.__typename === 'ProcessExited') {
            s.exited = true;
            markDone(s, at);
          }
          return;
        }
        case 'error':
          errors.push(`subscriber ${index}: ${JSON.stringify(message.payload).slice(0, 300)}`);
          markDone(s, at, false);
          return;
        case 'complete':
          markDone(s, at, s.exited);
          return;
        default:
      }
    });
  }
  setTimeout(drain, connectSec * 1000);
}

// Kept-alive connections for the GraphQL requests: node:http costs a fraction of fetch's CPU per
// request, so the client is not what a request-rate figure measures.
const httpAgent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

function post(url, key, query, variables) {
  const body = JSON.stringify({ query, variables });
  return new Promise((resolve, reject) => {
    const request = http.request(url, {
      method: 'POST',
      agent: httpAgent,
      headers: {
        'Content-Type': 'application/json',
        'Content-Length': Buffer.byteLength(body),
        Authorization: `Bearer ${key}`,
      },
    }, (response) => {
      const chunks = [];
      response.on('data', (chunk) => chunks.push(chunk));
      response.on('error', reject);
      response.on('end', () => {
        try {
          const answer = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          if (answer.errors) reject(new Error(JSON.stringify(answer.errors).slice(0, 300)));
          else resolve(answer.data);
        } catch (error) {
          reject(new Error(`HTTP ${response.statusCode}: ${error}`));
        }
      });
    });
    request.on('error', reject);
    request.end(body);
  });
}

async function exec() {
  const { url, key, query, variables, count, warm = 5 } = config;
  for (let i = 0; i < warm; i++) await post(url, key, query, variables);
  const times = [];
  for (let i = 0; i < count; i++) {
    const began = nowNs();
    await post(url, key, query, variables);
    times.push((nowNs() - began) / 1e6);
  }
  emit({ event: 'result', ms: summary(times) });
}

// A processEvents subscription (graphql-transport-ws) calling onEvent with each event and the
// wall-clock time it came; resolves with the socket once subscribed. An end of the subscription is
// an error: onEnd gets it, and so does the promise if it comes before the subscribe.
function followEvents(wsUrl, key, eventsQuery, capsuleId, onEvent, onEnd = () => {}) {
  const ws = new WebSocket(wsUrl, 'graphql-transport-ws');
  return new Promise((resolve, reject) => {
    ws.on('error', reject);
    ws.on('open', () => ws.send(JSON.stringify({ type: 'connection_init', payload: { Authorization: `Bearer ${key}` } })));
    ws.on('message', (data) => {
      const now = wallMs();
      const message = JSON.parse(data);
      if (message.type === 'connection_ack') {
        ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: eventsQuery, variables: { capsuleId } } }));
        resolve(ws);
      } else if (message.type === 'ping') ws.send(JSON.stringify({ type: 'pong' }));
      else if (message.type === 'next' && message.payload.data) onEvent(message.payload.data.processEvents, now);
      else if (message.type === 'error' || message.type === 'complete') {
        const error = new Error(`processEvents ended: ${JSON.stringify(message)}`);
        reject(error);
        onEnd(error);
      }
    });
  });
}

async function starts() {
  const { url, wsUrl, key, startQuery, eventsQuery, capsuleId, count, concurrency, timeoutSec = 120 } = config;
  const exited = new Set();
  let waiting = null; // resolves when every started tag has exited
  const started = new Set();
  let allStarted = false;
  const checkDone = () => {
    if (waiting && allStarted && [...started].every((tag) => exited.has(tag))) waiting();
  };
  const ws = await followEvents(wsUrl, key, eventsQuery, capsuleId, (event) => {
    if (event.kind === 'EXITED') {
      exited.add(event.process.tag);
      checkDone();
    }
  });
  const input = { cmd: 'true' };
  const startOne = async () => (await post(url, key, startQuery, { capsuleId, input })).startProcess.tag;
  // Warm: until the subscription sees an exit, which also says it is live.
  const deadline = nowNs() + 30e9;
  for (;;) {
    const tag = await startOne();
    const seen = await new Promise((resolve) => {
      const poll = setInterval(() => {
        if (exited.has(tag)) { clearInterval(poll); resolve(true); }
      }, 5);
      setTimeout(() => { clearInterval(poll); resolve(false); }, 2000);
    });
    if (seen) break;
    if (nowNs() > deadline) throw new Error('processEvents saw no exit within 30 s');
  }
  const began = nowNs();
  let next = 0;
  let startsDoneAt = null;
  const done = new Promise((resolve) => { waiting = resolve; });
  const worker = async () => {
    while (next < count) {
      next++;
      started.add(await startOne());
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  startsDoneAt = nowNs();
  allStarted = true;
  checkDone();
  const timer = setTimeout(() => waiting(), timeoutSec * 1000);
  await done;
  clearTimeout(timer);
  const end = nowNs();
  const recorded = [...started].filter((tag) => exited.has(tag)).length;
  emit({
    event: 'result',
    count,
    recorded,
    startsPerSec: count / ((startsDoneAt - began) / 1e9),
    recordedPerSec: recorded / ((end - began) / 1e9),
    seconds: (end - began) / 1e9,
  });
  ws.terminate();
}

// Wall-clock milliseconds now, with the monotonic clock's sub-millisecond part.
const wallMs = () => performance.timeOrigin + performance.now();

// An ISO 8601 time with microseconds (`at`) as wall-clock milliseconds, the microseconds kept.
function isoMs(text) {
  const fraction = /\.(\d+)/.exec(text);
  const micros = fraction ? Number((fraction[1] + '000000').slice(0, 6)) : 0;
  return Date.parse(text.replace(/\.\d+/, '')) + micros / 1000;
}

async function events() {
  const { url, wsUrl, key, startQuery, eventsQuery, capsuleId, count, concurrency, timeoutSec = 120 } = config;
  const pending = new Set();
  for (let i = 0; i < count; i++) for (const kind of ['STARTED', 'EXITED']) pending.add(`${kind} p-${i}`);
  const delays = { STARTED: [], EXITED: [] };
  let warmSeen = false;
  let finished = null;
  let failed = null;
  const done = new Promise((resolve, reject) => { finished = resolve; failed = reject; });
  let lastAt = null;
  const ws = await followEvents(wsUrl, key, eventsQuery, capsuleId, (event, now) => {
    if (event.process.tag.startsWith('warm-')) warmSeen = true;
    else if (pending.delete(`${event.kind} ${event.process.tag}`)) {
      delays[event.kind].push(now - isoMs(event.at));
      if (pending.size === 0) { lastAt = nowNs(); finished(); }
    }
  }, (error) => failed(error));
  const startOne = (tag) => post(url, key, startQuery, { capsuleId, tag });
  // Until the subscription is known to receive: warm-up processes, not measured.
  const deadline = nowNs() + 30e9;
  for (let i = 0; !warmSeen; i++) {
    await startOne(`warm-${i}`);
    const until = nowNs() + 1e9;
    while (!warmSeen && nowNs() < until) await new Promise((resolve) => setTimeout(resolve, 5));
    if (nowNs() > deadline) throw new Error('processEvents saw no event within 30 s');
  }
  const began = nowNs();
  let next = 0;
  const worker = async () => {
    while (next < count) await startOne(`p-${next++}`);
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  const timer = setTimeout(() => failed(new Error(`${pending.size} events still missing after ${timeoutSec} s`)), timeoutSec * 1000);
  await done;
  clearTimeout(timer);
  emit({
    event: 'result',
    events: 2 * count,
    seconds: (lastAt - began) / 1e9,
    delaysMs: delays,
  });
  ws.terminate();
}

const modes = { subscribe, exec, starts, events };
Promise.resolve(modes[mode]()).catch((error) => {
  emit({ event: 'error', message: String(error && error.stack ? error.stack : error) });
  process.exit(1);
});
