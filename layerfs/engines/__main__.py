"""``python -m layerfs.engines``: the engine servers in the foreground, logging to stderr.

    python -m layerfs.engines --root /var/lib/layerfs --driver overlay2 \\
        --containerd-snapshotter /run/layerfs/snapshotter.sock \\
        --docker-plugin layerfs-overlay2
"""

from __future__ import annotations

import argparse
import logging
import sys

from layerfs.errors import LayerfsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerfs.engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the layerfs root to serve")
    parser.add_argument("--driver", help="storage driver (default: the root's, or auto)")
    parser.add_argument("-s", "--storage-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="driver option (repeatable)")
    parser.add_argument("--containerd-snapshotter", metavar="SOCKET",
                        help="serve containerd's snapshots API on this unix socket")
    parser.add_argument("--docker-plugin", metavar="NAME",
                        help="serve Docker's graphdriver protocol as plugin NAME "
                             "(/run/docker/plugins/NAME.sock)")
    parser.add_argument("--docker-plugin-socket", metavar="SOCKET",
                        help="... on this socket instead (a plugin spec file points dockerd at it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every failed request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="layerfs-engines: %(message)s", stream=sys.stderr)
    from .server import docker_plugin_socket, serve

    try:
        plugin_socket = args.docker_plugin_socket
        if plugin_socket is None and args.docker_plugin:
            plugin_socket = docker_plugin_socket(args.docker_plugin)
        serve(args.root, args.driver, args.storage_opt or None,
              snapshotter_socket=args.containerd_snapshotter, graphdriver_socket=plugin_socket,
              on_ready=lambda: print("ready", flush=True))
    except LayerfsError as err:
        print(f"layerfs-engines: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
