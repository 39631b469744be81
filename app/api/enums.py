"""The contract's enums; most are the domain's own, exposed as they are."""

from __future__ import annotations

import enum
import signal

import strawberry

from app import domain

# strawberry.enum marks the domain's own classes as GraphQL enums; the aliases name them here.
strawberry.enum(domain.CapsuleStatus, name="CapsuleStatus")
strawberry.enum(domain.ProcessStatus, name="ProcessStatus")
strawberry.enum(domain.Stream, name="OutputStream")
strawberry.enum(
    domain.Encoding,
    name="Encoding",
    description="How a text field carries bytes: UTF8 when the bytes are valid UTF-8, else BASE64.",
)
strawberry.enum(
    domain.SignalScope,
    name="SignalScope",
    description="Who a signal reaches: the process alone, or its whole process group (children included).",
)
strawberry.enum(domain.ProcessEventKind, name="ProcessEventKind")
strawberry.enum(domain.WaitCondition, name="WaitCondition")

CapsuleStatus = domain.CapsuleStatus
ProcessStatus = domain.ProcessStatus
OutputStream = domain.Stream
Encoding = domain.Encoding
SignalScope = domain.SignalScope
ProcessEventKind = domain.ProcessEventKind
WaitCondition = domain.WaitCondition


@strawberry.enum
class RestartPolicy(enum.Enum):
    NEVER = "NEVER"
    ON_FAILURE = strawberry.enum_value(
        "ON_FAILURE", description="When it exits non-zero or a signal the service did not send ends it."
    )
    ALWAYS = strawberry.enum_value(
        "ALWAYS", description="Whenever it ends, unless the service stopped or signalled it."
    )

    def to_domain(self) -> domain.RestartPolicy:
        return domain.RestartPolicy(self.value)


@strawberry.enum(description="Where a capsule's processes run.")
class CapsuleRuntime(enum.Enum):
    SANDBOX = strawberry.enum_value(
        "SANDBOX",
        description="Namespaces of its own: its processes see and reach nothing outside the capsule.",
    )
    PLAIN = strawberry.enum_value(
        "PLAIN",
        description="On the host, as the agent's user, in the capsule's workspace: nothing is isolated.",
    )

    @classmethod
    def of(cls, runtime: domain.CapsuleRuntime) -> CapsuleRuntime:
        return cls(runtime.value)


@strawberry.enum(
    description="A POSIX signal. Any may be reported as the one that ended a process; "
    "signalProcess sends the first nine."
)
class Signal(enum.Enum):
    SIGHUP = "SIGHUP"
    SIGINT = "SIGINT"
    SIGQUIT = "SIGQUIT"
    SIGKILL = "SIGKILL"
    SIGUSR1 = "SIGUSR1"
    SIGUSR2 = "SIGUSR2"
    SIGTERM = "SIGTERM"
    SIGCONT = "SIGCONT"
    SIGSTOP = "SIGSTOP"
    SIGABRT = "SIGABRT"
    SIGALRM = "SIGALRM"
    SIGBUS = "SIGBUS"
    SIGCHLD = "SIGCHLD"
    SIGFPE = "SIGFPE"
    SIGILL = "SIGILL"
    SIGIO = "SIGIO"
    SIGPIPE = "SIGPIPE"
    SIGPROF = "SIGPROF"
    SIGPWR = "SIGPWR"
    SIGSEGV = "SIGSEGV"
    SIGSTKFLT = "SIGSTKFLT"
    SIGSYS = "SIGSYS"
    SIGTRAP = "SIGTRAP"
    SIGTSTP = "SIGTSTP"
    SIGTTIN = "SIGTTIN"
    SIGTTOU = "SIGTTOU"
    SIGURG = "SIGURG"
    SIGVTALRM = "SIGVTALRM"
    SIGWINCH = "SIGWINCH"
    SIGXCPU = "SIGXCPU"
    SIGXFSZ = "SIGXFSZ"

    @classmethod
    def of(cls, signum: signal.Signals | None) -> Signal | None:
        """The enum value of a signal number; None for none or a real-time signal."""
        return None if signum is None else cls.__members__.get(signum.name)

    def to_signal(self) -> signal.Signals:
        return signal.Signals[self.value]
