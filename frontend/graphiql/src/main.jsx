// GraphiQL for capsule, at the address of the page that loads this bundle.
import 'graphiql/setup-workers/vite';
import 'graphiql/style.css';

import { GraphiQL } from 'graphiql';
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';

import { createFetcher } from './fetcher.js';

const fetcher = createFetcher(`${window.location.origin}${window.location.pathname}`);

const DEFAULT_QUERY = `# GraphiQL for capsule, served by this server.
#
# Put your API key under Headers below:
#   {"Authorization": "Bearer <key>"}
# \`capsule serve\` prints the development key and
# writes it to .capsule/dev-api-key.
#
# Queries and mutations go over HTTP POST;
# subscriptions over a WebSocket to this same
# address, the headers as their connection_init.
#
# Ctrl-Enter runs. Try, with a capsule's id:
#   mutation { createCapsule { id } }
#   subscription {
#     processEvents(capsuleId: "<id>") {
#       kind
#       process { pid tag status }
#     }
#   }

{
  capsules {
    id
    status
  }
}
`;

const DEFAULT_HEADERS = `// Your API key, for HTTP and connection_init:
// {"Authorization": "Bearer <key>"}
`;

createRoot(document.getElementById('graphiql')).render(
  <StrictMode>
    <GraphiQL
      fetcher={fetcher}
      defaultQuery={DEFAULT_QUERY}
      defaultHeaders={DEFAULT_HEADERS}
      defaultEditorToolsVisibility="headers"
      isHeadersEditorEnabled
    />
  </StrictMode>,
);
