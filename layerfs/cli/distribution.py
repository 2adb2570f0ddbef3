"""``layerfs pull|push|login|logout``: images to and from registries.

Thin like the other command groups: parse, call :mod:`layerfs.distribution`,
render. httpx is imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InvalidArgument
from . import console
from .common import SubParsers, command_parser
from .images import image_store, progress_for

TYPE_CHECKING = False       # no typing or library imports until a command runs
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..distribution import RegistryOptions


def _options(args: argparse.Namespace) -> RegistryOptions:
    from ..distribution import RegistryOptions

    bounds = {name: getattr(args, name) for name in ("deadline", "speed_limit", "speed_time")
              if getattr(args, name, None) is not None}
    return RegistryOptions(ca=args.ca, insecure=args.insecure, **bounds)


def _say(args: argparse.Namespace) -> Callable[[str], None] | None:
    """Where the library reports progress lines (Docker's pull/push lines), unless -q."""
    if args.quiet:
        return None
    return lambda line: print(line, flush=True)


def cmd_pull(args: argparse.Namespace) -> int:
    from ..distribution import RemoteReference, pull

    ref = RemoteReference.parse(args.reference)
    if not args.quiet:
        print(f"{ref.tag or ref.digest}: Pulling from {ref.name}", flush=True)
    with image_store(args) as images, progress_for(args) as progress:
        result = pull(images, ref, platform=args.platform, options=_options(args),
                      resume=args.resume, progress=progress, report=_say(args))
    if args.quiet:
        print(result.image.id)
        return 0
    print(f"Digest: {result.index_digest or result.manifest_digest}")
    shown = result.name or f"{ref.name}@{ref.digest}"
    if result.up_to_date:
        print(f"Status: Image is up to date for {shown}")
    else:
        print(f"Status: Downloaded newer image for {shown}")
    print(result.name or result.image.id)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..distribution import push

    if args.format == "docker" and args.compression == "zstd":
        raise InvalidArgument("--compression zstd needs --format oci (Docker manifests "
                              "cannot name zstd layers)")
    with image_store(args) as images, progress_for(args) as progress:
        result = push(images, args.image, args.destination, format=args.format,
                      compression=args.compression, options=_options(args),
                      progress=progress, report=_say(args))
    if args.quiet:
        print(result.digest)
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        if sys.stdin.isatty():
            raise InvalidArgument("--password-stdin: pipe the password in, e.g. "
                                  "`cat pw.txt | layerfs login -u USER --password-stdin HOST`")
        password = sys.stdin.read()
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
    else:
        if not sys.stdin.isatty():
            raise InvalidArgument("no terminal to ask for the password: use --password-stdin")
        import getpass

        password = getpass.getpass("Password: ")
    if not password:
        raise InvalidArgument("empty password")
    return password


def cmd_login(args: argparse.Namespace) -> int:
    from ..distribution import login
    from ..distribution.auth import Credentials, CredentialStore

    username = args.username
    if not username:
        if args.password_stdin or not sys.stdin.isatty():
            raise InvalidArgument("give the user name with -u USER")
        username = input("Username: ").strip()
        if not username:
            raise InvalidArgument("empty user name")
    password = _read_password(args)
    store = CredentialStore()
    host = login(args.server, Credentials(username, password), options=_options(args),
                 store=store)
    console.err.print(f"Credentials for {host} are stored unencrypted in {store.path} (mode 0600).",
              highlight=False)
    print("Login Succeeded")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from ..distribution import logout
    from ..distribution.auth import CredentialStore, registry_host

    host = registry_host(args.server)
    if logout(args.server, store=CredentialStore()):
        print(f"Removing login credentials for {host}")
    else:
        print(f"Not logged in to {host}")
    return 0


# --- parser -------------------------------------------------------------------------------------

def _tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", metavar="FILE", help="PEM file with the CA certificate(s) the "
                   "registry's TLS certificate is checked against (besides the system CAs)")
    p.add_argument("--insecure", action="store_true", help="for the registry host named in "
                   "the reference only: do not check its TLS certificate, and use plain HTTP "
                   "if it does not speak TLS")
    p.add_argument("--max-time", dest="deadline", type=_seconds, metavar="SECONDS",
                   help="longest a single request (manifest, config, token, upload step, the "
                   "answer to an upload) may take, retries included (default 300)")
    p.add_argument("--speed-limit", type=int, metavar="BYTES", help="a blob download or "
                   "upload slower than BYTES per second for --speed-time seconds fails "
                   "(default 1024)")
    p.add_argument("--speed-time", type=_seconds, metavar="SECONDS",
                   help="see --speed-limit (default 30)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def register(sub: SubParsers) -> None:
    p = command_parser(sub, "pull", "download an image from a registry",
                       "Pull REGISTRY/REPO:TAG (or @DIGEST) into the root: layers the root already "
                       "has are skipped, the others are downloaded in parallel and applied as they "
                       "arrive; every digest is checked. A connection cut mid-layer is resumed "
                       "within the pull. On any error no image is left behind, and no partial "
                       "download either unless --resume asked to keep it. Manifest lists and OCI "
                       "indexes resolve to this host's platform (or --platform).",
                       "  layerfs pull 127.0.0.1:5000/lab/app:v1\n"
                       "  layerfs pull --platform linux/arm64 registry.example.com/tools/jq:1.7\n"
                       "  layerfs pull --ca ca.pem registry.lab:5443/app@sha256:3f2a…\n"
                       "  layerfs pull --insecure 127.0.0.1:5000/lab/app:v1   # plain HTTP\n"
                       "  layerfs pull --resume registry.lab/big:1   # again after a cut: "
                       "continues\n")
    p.add_argument("reference", metavar="REGISTRY/REPO[:TAG|@DIGEST]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="which image of a multi-platform index (default: this host's)")
    p.add_argument("--resume", action="store_true", help="if this pull fails on the network, "
                   "the speed limit or Ctrl-C, keep its partly downloaded layers (under "
                   "ROOT/tmp, removed after a day), and continue from those an earlier --resume "
                   "pull kept. Without it a failed pull removes them and every layer starts "
                   "from its first byte (leftovers of a killed pull are discarded)")
    _tls(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress, print only the image id")
    p.set_defaults(func=cmd_pull)

    p = command_parser(sub, "push", "upload an image to a registry",
                       "Push IMAGE (a name or id) to DESTINATION (default: IMAGE itself, which must "
                       "then name a registry). Layers the registry already has are skipped (HEAD), "
                       "layers known to be in another repository of the same registry are "
                       "cross-mounted, the rest are compressed and uploaded in parallel. The image "
                       "config is pushed as it is, so the image id stays the same.",
                       "  layerfs push lab/app:v1 127.0.0.1:5000/lab/app:v1\n"
                       "  layerfs push 127.0.0.1:5000/lab/app:v1\n"
                       "  layerfs push --format oci --compression zstd app 127.0.0.1:5000/app:zst\n")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("destination", nargs="?", metavar="REGISTRY/REPO[:TAG]")
    p.add_argument("--format", choices=["docker", "oci"], default="docker",
                   help="manifest format (default: %(default)s, as docker push)")
    p.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip",
                   help="of layer blobs (default: %(default)s; zstd needs --format oci)")
    _tls(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress, print only the manifest digest")
    p.set_defaults(func=cmd_push)

    p = command_parser(sub, "login", "store credentials for a registry",
                       "Check USER and the password against the registry (basic or token auth), "
                       "then store them like `docker login` does, in $LAYERFS_CONFIG/config.json or "
                       "~/.config/layerfs/config.json (mode 0600). The password is read from stdin "
                       "(--password-stdin) or asked for; it is never printed.",
                       "  layerfs login -u alice 127.0.0.1:5443\n"
                       "  cat pw.txt | layerfs login -u alice --password-stdin --ca ca.pem "
                       "127.0.0.1:5443\n")
    p.add_argument("server", metavar="REGISTRY")
    p.add_argument("-u", "--username", metavar="USER", help="user name (default: asked on the "
                   "terminal)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _tls(p)
    p.set_defaults(func=cmd_login, quiet=True)

    p = command_parser(sub, "logout", "forget the credentials of a registry",
                       "Remove the stored credentials of REGISTRY.", "  layerfs logout 127.0.0.1:5443\n")
    p.add_argument("server", metavar="REGISTRY")
    p.set_defaults(func=cmd_logout)


__all__ = ["register"]
