// Bundles the log viewer into app/api/static/viewer/, which is committed: the server never fetches
// anything at install or run time. Rebuild: cd frontend/viewer && npm ci && npm run build
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

const outDir = fileURLToPath(new URL('../../app/api/static/viewer', import.meta.url));

export default defineConfig({
  base: './',
  oxc: { jsx: { runtime: 'automatic', importSource: 'preact' } },
  build: {
    outDir,
    emptyOutDir: true,
    // One script and one stylesheet under stable names, which app/api/viewer.py writes into its page.
    cssCodeSplit: false,
    rolldownOptions: {
      input: fileURLToPath(new URL('src/main.tsx', import.meta.url)),
      output: {
        codeSplitting: false,
        entryFileNames: 'viewer.js',
        assetFileNames: ({ names }) => (names.some((name) => name.endsWith('.css')) ? 'viewer.css' : '[name][extname]'),
      },
    },
  },
});
