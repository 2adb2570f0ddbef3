"""``layerfs daemon``: the command that runs :class:`~layerfs.daemon.server.Supervisor`."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli.common import SubParsers, command_parser

DESCRIPTION = (
    "Serve this root's commands from one warm process: every `layerfs` command on the root "
    "(any user of the CLI: shells, scripts, labs) goes to the daemon when its socket "
    "ROOT/daemon.sock answers, runs there in a forked worker with the caller's stdin, "
    "stdout, stderr, cwd and environment, and returns its exit status; without a daemon, "
    "commands run in-process as before. Runs in the foreground and logs to stderr; "
    "SIGTERM, SIGINT or SIGHUP stop it after the running commands finish (--drain-timeout). "
    "Also accepts its listening socket from systemd (socket activation, see docs/daemon.md).")

EXAMPLES = """\
  layerfs daemon --root /var/lib/layerfs &         # then, in any shell:
  layerfs run --rm busybox true                     # served by the daemon
  LAYERFS_DAEMON=0 layerfs run --rm busybox true    # in-process, daemon or not
  LAYERFS_DAEMON=1 layerfs layer ls                 # fails unless a daemon answers
  systemctl enable --now layerfs@$(systemd-escape --path /var/lib/layerfs).socket
"""


def register(sub: SubParsers) -> None:
    p = command_parser(sub, "daemon", "serve this root's commands from one warm process",
                       DESCRIPTION, EXAMPLES)
    p.add_argument("--root", dest="daemon_root", metavar="ROOT",
                   help="the root to serve (default: the global --root)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="when stopping, how long running commands may take before they get "
                   "SIGTERM (default: %(default)s)")
    p.add_argument("--hangup-grace", type=float, default=10.0, metavar="SECONDS",
                   help="a command whose client went away gets SIGHUP, then SIGTERM and "
                   "SIGKILL this many seconds apart (default: %(default)s)")
    p.add_argument("--service", action="append", default=[], metavar="'NAME ARG...'",
                   help="also run this server in a supervised child process: an entry point "
                   "of the group layerfs.daemon.services (the engines' endpoints) or "
                   "module:function, with its arguments (repeatable; see docs/daemon.md)")
    p.add_argument("--log-level", default=os.environ.get("LAYERFS_DAEMON_LOG", "info"),
                   choices=["debug", "info", "warning", "error"],
                   help="what the log on stderr shows (default: $LAYERFS_DAEMON_LOG, else "
                   "%(default)s; debug adds every worker's start)")
    p.set_defaults(func=cmd_daemon)


def cmd_daemon(args: argparse.Namespace) -> int:
    import logging

    from . import services
    from .server import Supervisor, log

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s layerfs daemon: %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    log.propagate = False
    supervisor = Supervisor(args.daemon_root or args.root, drain_timeout=args.drain_timeout,
                            hangup_grace=args.hangup_grace,
                            services=[services.parse(s) for s in args.service])
    return supervisor.serve()
