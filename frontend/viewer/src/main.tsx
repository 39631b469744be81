// The log viewer, at the address of the page that loads this bundle.
import './style.css';

import { render } from 'preact';

import { App, type Config } from './app';

const config = JSON.parse(document.getElementById('viewer-config')?.textContent || '{}') as Partial<Config>;

render(
  <App config={{ graphqlPath: config.graphqlPath ?? '/graphql', devKey: config.devKey ?? null }} />,
  document.getElementById('viewer')!,
);
