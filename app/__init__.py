"""Capsule process service."""

import os

# gRPC's fork handlers serve a process that forks and goes on using gRPC in the child; ours fork
# only to exec at once, and with the handlers on, each spawn beside a busy channel prints a notice
# ("Other threads are currently calling into gRPC, skipping fork() handlers"). Off before any
# module of ours loads grpc; an operator's own setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
