// Bundles GraphiQL into app/api/static/graphiql/, which is committed: the server never fetches
// anything at install or run time. Rebuild: cd frontend/graphiql && npm ci && npm run build
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

const outDir = fileURLToPath(new URL('../../app/api/static/graphiql', import.meta.url));

export default defineConfig({
  // Relative URLs, so workers and chunks load from wherever the server mounts the folder.
  base: './',
  build: {
    outDir,
    emptyOutDir: true,
    // One script and one stylesheet besides Monaco's workers, under stable names that
    // app/api/graphiql.py writes into its page.
    cssCodeSplit: false,
    rolldownOptions: {
      input: fileURLToPath(new URL('src/main.jsx', import.meta.url)),
      output: {
        codeSplitting: false,
        entryFileNames: 'graphiql.js',
        assetFileNames: ({ names }) => (names.some((name) => name.endsWith('.css')) ? 'graphiql.css' : '[name][extname]'),
      },
    },
    chunkSizeWarningLimit: 8192,
  },
  worker: {
    rolldownOptions: { output: { entryFileNames: '[name].js' } },
  },
});
