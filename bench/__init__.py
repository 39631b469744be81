"""Benchmarks, run by hand: `python -m bench` runs the suite (see bench/__main__.py); the modules
agent_stream, api_stream, capsule_start and serve_start each measure one layer on its own."""
