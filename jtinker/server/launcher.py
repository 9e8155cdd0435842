"""Command line and process set-up of ``jtinker serve``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("jtinker.server")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Adds the ``serve`` options to ``parser`` (a new one when None) and returns it."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="jtinker serve",
            description="Serve the Tinker HTTP API (tinker SDK 0.38) over jtinker's engine.",
        )
    parser.add_argument(
        "--base-model",
        action="append",
        default=[],
        dest="base_models",
        metavar="NAME",
        help="base model to preload (repeatable); when given, only these base models are served",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--mesh", default=None, help="device mesh, e.g. fsdp=8 or fsdp=4,tp=2 (default: one device)"
    )
    parser.add_argument(
        "--api-key-file",
        default=None,
        help="file of accepted API keys, one per line (also $JTINKER_API_KEYS)",
    )
    parser.add_argument(
        "--home", default=None, help="server home: checkpoints in HOME/runs, metadata in HOME/server.db "
        "(default $JTINKER_HOME or ~/.jtinker)"
    )  # fmt: skip
    parser.add_argument(
        "--db",
        "--db-url",
        dest="db_url",
        default=None,
        help="metadata database: sqlite:///path.db (default HOME/server.db) or "
        "postgresql://user:password@host:port/dbname (needs psycopg: pip install 'jtinker[postgres]')",
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=256.0, help="largest accepted request body, MiB (default 256)"
    )
    parser.add_argument(
        "--sdk-versions",
        default="0.38",
        help="accepted tinker SDK versions, comma-separated prefixes, '*' for any (default 0.38)",
    )
    parser.add_argument(
        "--fwdbwd-max-chunk-len",
        type=int,
        default=1024,
        help="datums per forward_backward chunk the SDK is told to send (default 1024)",
    )
    parser.add_argument(
        "--poll-timeout",
        type=float,
        default=5.0,
        help="seconds retrieve_future waits for a result before answering try_again (default 5)",
    )
    parser.add_argument(
        "--allow-any-key",
        action="store_true",
        help="accept every tml- key, each as its own owner (local testing only)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


SERVE_OPTIONS = (
    "base_models", "host", "port", "mesh", "api_key_file", "home", "db_url", "max_body_mb", "sdk_versions",
    "fwdbwd_max_chunk_len", "poll_timeout", "allow_any_key", "log_level",
)  # fmt: skip


def _lock_home(home: Path):
    """One server per home: futures, sessions and the seq_id order live in this process's memory."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    handle = open(home / "server.lock", "w")  # noqa: SIM115 - the lock lasts as long as the file is open
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(f"another jtinker server is already running with home {home}") from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def main(argv: Sequence[str] | None = None) -> int:
    return serve_from_args(build_parser().parse_args(argv))


def serve_from_args(args: argparse.Namespace) -> int:
    """:func:`serve` with the options :func:`build_parser` added (other attributes are ignored)."""
    return serve(**{name: getattr(args, name) for name in SERVE_OPTIONS if hasattr(args, name)})


def serve(
    *,
    base_models: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 8000,
    mesh: str | None = None,
    api_key_file: str | None = None,
    home: str | None = None,
    db_url: str | None = None,
    max_body_mb: float = 256.0,
    sdk_versions: str | Sequence[str] = "0.38",
    fwdbwd_max_chunk_len: int = 1024,
    poll_timeout: float = 5.0,
    allow_any_key: bool = False,
    log_level: str = "info",
    api_keys: Sequence[str] | None = None,
) -> int:
    """Runs the server until SIGINT/SIGTERM; returns the exit status (2 for a configuration error).

    ``api_keys`` adds keys programmatically, besides ``api_key_file`` and ``$JTINKER_API_KEYS``.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if home is not None:
        # Built-in models, the default store and everything else jtinker keeps go under the server home.
        os.environ["JTINKER_HOME"] = str(Path(home).expanduser().resolve())
    try:
        import uvicorn

        from jtinker import registry
        from jtinker.server.app import ServerConfig, create_app
        from jtinker.server.auth import KeyRing, load_keys
        from jtinker.server.state.db import open_database
    except ImportError as e:
        print(f"jtinker serve: missing dependency ({e}); pip install 'jtinker[server]'", file=sys.stderr)
        return 2

    home_dir = registry.home()
    try:
        lock = _lock_home(home_dir)  # noqa: F841 - held (open) for the life of the process
        keys = load_keys(api_key_file) + list(api_keys or [])
        if not keys and not allow_any_key:
            raise ValueError("no API keys: pass --api-key-file FILE or set JTINKER_API_KEYS=tml-...,tml-...")
        db = open_database(db_url, home_dir)
        if isinstance(sdk_versions, str):
            sdk_versions = [v.strip() for v in sdk_versions.split(",") if v.strip()]
        if max_body_mb <= 0 or fwdbwd_max_chunk_len < 1 or not 0 < poll_timeout <= 30:
            raise ValueError(
                "--max-body-mb and --fwdbwd-max-chunk-len must be positive, --poll-timeout in (0, 30]"
            )
    except (ValueError, OSError) as e:
        print(f"jtinker serve: {e}", file=sys.stderr)
        return 2
    config = ServerConfig(
        home=home_dir,
        base_models=list(base_models),
        host=host,
        port=port,
        mesh=mesh,
        db_url=db_url,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        sdk_versions=tuple(sdk_versions),
        fwdbwd_max_chunk_len=fwdbwd_max_chunk_len,
        poll_timeout_s=poll_timeout,
    )
    app = create_app(config, KeyRing(keys, allow_any=allow_any_key), db)
    log.info(
        "jtinker serve: http://%s:%d (home %s, db %s, %d API key(s)%s)",
        host,
        port,
        home_dir,
        db.location,
        len(keys),
        ", any tml- key accepted" if allow_any_key else "",
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=log_level == "debug",
            timeout_keep_alive=75,  # longer than the SDK's idle reuse: fewer races on closed sockets
            lifespan="on",
        )
    )
    server.run()
    return 0
