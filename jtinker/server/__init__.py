"""``jtinker serve``: an HTTP server speaking the official tinker SDK's wire protocol (0.38).

    JTINKER_API_KEYS=tml-mykey-0123456789 python -m jtinker.server --base-model jtinker/tiny-qwen3

then, unchanged SDK code::

    import tinker
    service = tinker.ServiceClient(base_url="http://127.0.0.1:8000", api_key="tml-mykey-0123456789")
    training = service.create_lora_training_client("jtinker/tiny-qwen3", rank=8).result()

Checkpoints go to ``<home>/runs`` (the same store the in-process API and ``jtinker checkpoints`` use)
and metadata (owners, sessions, futures) to ``<home>/server.db``, or to PostgreSQL with
``--db postgresql://user:password@host/dbname`` (needs the ``postgres`` extra). One server process
per home. ``forward_backward`` requests of different models that wait together run as one jitted step.
Needs the ``server`` extra (fastapi, uvicorn, tinker==0.38.0); the core library never imports
``tinker``, and importing this package stays cheap until :func:`main` or :func:`serve` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    """``jtinker serve`` / ``python -m jtinker.server`` with ``argv`` (default ``sys.argv[1:]``)."""
    from jtinker.server.launcher import main as _main

    return _main(argv)


def serve(**kwargs: Any) -> int:
    """Runs the server until interrupted; keyword arguments as in :func:`jtinker.server.launcher.serve`."""
    from jtinker.server.launcher import serve as _serve

    return _serve(**kwargs)


def serve_from_args(args: Any) -> int:
    """:func:`serve` from an ``argparse.Namespace`` filled by :func:`build_parser` (extra attributes,
    e.g. a parent CLI's ``command``/``func``, are ignored)."""
    from jtinker.server.launcher import serve_from_args as _serve_from_args

    return _serve_from_args(args)


def build_parser(parser: Any = None) -> Any:
    """The ``serve`` options, added to ``parser`` (an ``argparse.ArgumentParser``) or a new one."""
    from jtinker.server.launcher import build_parser as _build_parser

    return _build_parser(parser)


__all__ = ["build_parser", "main", "serve", "serve_from_args"]
