// Runs graphql-http's GraphQL-over-HTTP server audit against URL, sending KEY as a bearer token on
// every request, and prints one JSON line: [{id, name, status, reason?, response?}], response being
// the failing answer's status, content type and body. Exits 0 once the audit ran (its results are
// for the caller to judge), 2 on bad arguments.
import { auditServer } from 'graphql-http';

const [url, key] = process.argv.slice(2);
if (!url || !key) {
  console.error('usage: node audit.bundle.mjs URL KEY');
  process.exit(2);
}

function withKey(input, init = {}) {
  const headers = new Headers(init.headers);
  headers.set('authorization', `Bearer ${key}`);
  return fetch(input, { ...init, headers });
}

const results = await auditServer({ url, fetchFn: withKey });
const report = [];
for (const result of results) {
  const entry = { id: result.id, name: result.name, status: result.status };
  if (result.status !== 'ok') {
    entry.reason = result.reason;
    const response = result.response;
    let body = '';
    try {
      body = await response.text();
    } catch {
      body = '(body already read)';
    }
    entry.response = {
      status: response.status,
      contentType: response.headers.get('content-type'),
      body: body.slice(0, 2000),
    };
  }
  report.push(entry);
}
console.log(JSON.stringify(report));
