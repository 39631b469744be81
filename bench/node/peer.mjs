// The Node peer: a graphql-ws server (graphql-js, ws) that runs one command and fans its output out
// to every processOutput subscriber, the way a hand-rolled Node log server would.
//
//   node peer.mjs CONFIG_JSON      config: {"port": P, "argv": [cmd, ...args], "backlog": 2048}
//
// The schema is the part of capsule's contract that ProcessOutput.graphql selects, so the same
// document and the same client run against both. Every subscriber replays the output kept so far
// from its fromSeq, then follows live; each event is executed once per subscriber, as graphql-ws does.
// POST /close-input closes the command's stdin (the writers wait for that before they write);
// GET /healthz answers once the server listens.

import { spawn } from 'node:child_process';
import http from 'node:http';
import { buildSchema } from 'graphql';
import { useServer } from 'graphql-ws/use/ws';
import { WebSocketServer } from 'ws';

const config = JSON.parse(process.argv[2]);

const schema = buildSchema(`
  scalar DateTime
  enum OutputStream { STDOUT STDERR }
  enum Encoding { UTF8 BASE64 }
  enum Signal { SIGHUP SIGINT SIGQUIT SIGKILL SIGTERM SIGUSR1 SIGUSR2 SIGSTOP SIGCONT }
  type OutputChunk { seq: Int! stream: OutputStream! data: String! encoding: Encoding! }
  type OutputGap { seq: Int! lostEvents: Int! lostBytes: Float! }
  type ProcessRestarted { seq: Int! pid: Int! restarts: Int! exitCode: Int signal: Signal oomKilled: Boolean! }
  type ProcessExited {
    seq: Int! exitCode: Int signal: Signal timedOut: Boolean! endedAt: DateTime! oomKilled: Boolean!
  }
  union ProcessOutputEvent = OutputChunk | OutputGap | ProcessRestarted | ProcessExited
  type Query { ok: Boolean }
  type Subscription {
    processOutput(capsuleId: ID!, selector: String!, fromSeq: Int! = 0): ProcessOutputEvent!
  }
`);

const history = [];
const listeners = new Set();
let seq = 0;

function publish(event) {
  history.push(event);
  for (const listener of listeners) listener(event);
}

const child = spawn(config.argv[0], config.argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
const chunk = (stream) => (data) =>
  publish({ __typename: 'OutputChunk', seq: ++seq, stream, data: data.toString('utf8'), encoding: 'UTF8' });
child.stdout.on('data', chunk('STDOUT'));
child.stderr.on('data', chunk('STDERR'));
child.on('close', (code) =>
  publish({
    __typename: 'ProcessExited', seq: ++seq, exitCode: code, signal: null, timedOut: false,
    endedAt: new Date().toISOString(), oomKilled: false,
  }),
);

async function* follow(fromSeq) {
  const queue = history.filter((event) => event.seq >= fromSeq);
  let head = 0;
  let wake = null;
  const listener = (event) => {
    queue.push(event);
    if (wake) {
      wake();
      wake = null;
    }
  };
  listeners.add(listener);
  try {
    for (;;) {
      while (head < queue.length) {
        const event = queue[head];
        queue[head++] = undefined;
        yield { processOutput: event };
        if (event.__typename === 'ProcessExited') return;
      }
      await new Promise((resolve) => { wake = resolve; });
    }
  } finally {
    listeners.delete(listener);
  }
}

const field = schema.getSubscriptionType().getFields().processOutput;
field.subscribe = (_source, args) => follow(args.fromSeq);
field.resolve = (payload) => payload.processOutput;

const server = http.createServer((request, response) => {
  if (request.method === 'POST' && request.url === '/close-input') {
    child.stdin.end();
    response.end('ok');
  } else if (request.url === '/healthz') {
    response.end('ok');
  } else {
    response.statusCode = 404;
    response.end();
  }
});
const wss = new WebSocketServer({ server, path: '/graphql' });
useServer({ schema, onConnect: () => true }, wss);
server.listen(config.port, '127.0.0.1', config.backlog ?? 2048);
