// Queries and mutations over HTTP POST, subscriptions over graphql-ws (the graphql-transport-ws
// protocol), both to one address and both with the Headers editor's headers.
import { createGraphiQLFetcher } from '@graphiql/toolkit';
import { getOperationAST, parse } from 'graphql';
import { createClient } from 'graphql-ws';

// The server closes a socket whose connection_init carries no valid key with this code.
const FORBIDDEN = 4403;

const isCloseEvent = (error) => typeof error?.code === 'number' && 'reason' in error;

// GraphiQL prints an Error's message; a CloseEvent or a bare Event would print as "{}".
function readable(error, url) {
  if (isCloseEvent(error)) {
    return new Error(`WebSocket ${url} closed with ${error.code}: ${error.reason || 'no reason given'}`);
  }
  if (error instanceof Event) return new Error(`cannot reach the WebSocket at ${url}`);
  return error;
}

// A client per subscription, so the connection_init payload (where the server reads the key) is
// the headers as they are when the subscription starts, not as they were when the page loaded.
function subscribe(url, params, headers) {
  return {
    subscribe(observer) {
      const client = createClient({
        url,
        connectionParams: headers ?? {},
        // A refused key stays refused; a dropped connection (a server restart) is worth retrying.
        shouldRetry: (error) => isCloseEvent(error) && error.code !== FORBIDDEN,
      });
      const end = client.subscribe(params, {
        next: (result) => observer.next(result),
        error: (error) => {
          observer.error(readable(error, url));
          client.dispose();
        },
        complete: () => {
          observer.complete();
          client.dispose();
        },
      });
      return {
        unsubscribe() {
          end();
          client.dispose();
        },
      };
    },
  };
}

// What the request itself runs: GraphiQL's own parse of the editor (options.documentAST) lags behind
// text pasted and run at once, and would send a subscription over HTTP.
function isSubscription(params) {
  try {
    return getOperationAST(parse(params.query), params.operationName)?.operation === 'subscription';
  } catch {
    return false; // the server answers a document that does not parse
  }
}

export function createFetcher(url) {
  const http = createGraphiQLFetcher({ url });
  const subscriptionUrl = url.replace(/^http/, 'ws');
  return (params, options) => {
    if (isSubscription(params)) return subscribe(subscriptionUrl, params, options?.headers);
    return http(params, options);
  };
}
