"""What the command line checks before it acts, and how it reports a user's error.

Every user error exits with code 1 and one red line saying what was wrong and what to do
(:func:`user_errors`); an operating-system error names the path and the fix
(:func:`os_error_message`); ``learn`` on an existing store refuses options that contradict
the store (:func:`check_store_options`).
"""

from __future__ import annotations

import errno
import functools
from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)


def user_errors(fn):
    """Turn the library's user-facing errors into one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from safetensors import SafetensorError
        from torch.distributed import DistError

        from sharecl.distributed import RankAborted
        from sharecl.interop.peft import AdapterError
        from sharecl.store import StoreError
        from sharecl.train import NonFiniteLossError

        try:
            return fn(*args, **kwargs)
        except (ValueError, KeyError, StoreError, AdapterError, NonFiniteLossError, SafetensorError, OSError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            if isinstance(exc, OSError) and exc.errno is not None:
                msg = os_error_message(exc)
            err.print(f"[bold red]error:[/] {msg}", highlight=False)
            raise typer.Exit(1) from None
        except RankAborted:  # rank 0 printed the reason
            raise typer.Exit(1) from None
        except DistError as exc:  # a peer rank died or hung: say so in one line, write nothing
            err.print(f"[bold red]error:[/] another process of this torchrun job failed or stopped answering "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); nothing was written by this step, "
                      f"a store stays at its previous version; see the failing rank's message above", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


#: What to do about an operating-system error, by errno.
_OS_FIXES = {
    errno.EACCES: "check the permissions of that path (or use a directory you may write)",
    errno.EPERM: "check the permissions of that path (or use a directory you may write)",
    errno.ENOSPC: "free some disk space or use another disk",
    errno.EDQUOT: "free some space within your disk quota or use another disk",
    errno.EROFS: "the filesystem is read-only: use a writable location",
    errno.EEXIST: "a file already has that name: choose another path",
    errno.ENOTDIR: "a part of that path is a file, not a directory: choose another path",
    errno.EISDIR: "that path is a directory: name a file",
    errno.ENOENT: "check the path",
}


def os_error_message(exc: OSError) -> str:
    """One sentence for an ``OSError``: what failed, on which path, and what to do."""
    path = f" {exc.filename}" if exc.filename else ""
    fix = _OS_FIXES.get(exc.errno or 0, "check the path and the disk")
    return f"{exc.strerror or exc}:{path}; {fix}. A store keeps its previous version (writes are atomic)"


def check_store_options(store: Path, method_name, model, rank, image_size, share_opts: dict) -> str | None:
    """Refuse ``learn`` options that contradict an existing store (a store keeps the options it
    was created with). Returns the base model path to load from when ``--model`` names the
    store's own base model at a new location, else None.

    Raises:
        ValueError: naming the first contradicting option, the store's value and the fix.
    """
    from sharecl.backbone import weights_hash
    from sharecl.cli_common import takes_share_options
    from sharecl.store import read_manifest

    m = read_manifest(store)
    config, fix = m.get("config", {}), "drop the option (a store keeps the options it was created with) or use another store"
    if method_name is not None and method_name != m["method"]:
        raise ValueError(f"--method {method_name} contradicts {store}, which holds method {m['method']!r}; {fix}")
    if not takes_share_options(m["method"]):
        given = [f"--{n.replace('_', '-')}" for n, v in share_opts.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to Share stores only; {store} holds method {m['method']!r}; {fix}")
    for key, flag, value in [("r", "--rank", rank)] + [(n, f"--{n.replace('_', '-')}", v) for n, v in share_opts.items()]:
        if value is not None and config.get(key) != value:
            raise ValueError(f"{flag} {value} contradicts {store}, whose {key} is {config.get(key)!r}; {fix}")
    if image_size is not None and m.get("image_size") != image_size:
        raise ValueError(f"--image-size {image_size} contradicts {store}, whose images are {m.get('image_size')!r} "
                         f"pixels a side; {fix}")
    if model is None:
        return None
    base = m["base_model"]
    if not Path(model, "config.json").exists() or weights_hash(model) != base["sha256"]:
        raise ValueError(f"--model {model} is not the base model {store} was built on ({base['path']}, sha256 "
                         f"{base['sha256'][:12]}…); drop --model, or pass that model's new location")
    return str(model)
