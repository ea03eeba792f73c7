"""Kandinsky Studio: the Gradio app.

    python app.py --demo          # tiny random-weight models built locally: offline, seconds per image
    python app.py                 # the published kandinsky-community 2.2, 2.1 and 3 models, downloaded on first use
    python app.py --models 2.2,3  # offer only some of them

flags -> EngineConfig -> Engine (engine thread + model manager + task executor) -> build_ui -> launch.
Extra flags can also come from the KANDINSKY_STUDIO_ARGS environment variable (e.g. on a
Hugging Face Space, where the command line is fixed).
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import sys
import tempfile
from pathlib import Path

MAX_UPLOAD = "50mb"      # Gradio refuses larger uploads; backend/metadata.py reads PNGs up to the same size

logger = logging.getLogger("kandinsky_studio")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="Kandinsky Studio: Kandinsky 2.1, 2.2 and 3 "
                                                                "on MindSpore, in the browser.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also publish a temporary *.gradio.live link")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                        help="require this login (repeat for several users)")
    parser.add_argument("--auth-file", help="file with one USER:PASSWORD per line ('#' starts a comment)")
    parser.add_argument("--admin", action="append", default=[], metavar="USER",
                        help="a --auth user who may unload models and set the memory budget for everyone (repeat "
                             "for several); without --auth only a browser on this machine may")
    parser.add_argument("--max-jobs-per-user", type=int, default=4, metavar="N",
                        help="jobs one user (browser, API client or login) may have running or waiting (default 4)")
    parser.add_argument("--login-lockout", type=float, default=None, metavar="SECONDS",
                        help="how long 10 failed logins in a row lock that user name and address (default 300)")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="serve beyond this machine (--share or a non-loopback --host) without a login")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu", "ascend"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights and products: auto (default) is bfloat16 on a CPU with native bfloat16 "
                             "products (avx512_bf16, AMX), float16 on GPU and Ascend, float32 otherwise")
    parser.add_argument("--offline", action="store_true",
                        help="never download: use the Hugging Face cache and --models-dir only")
    parser.add_argument("--models-dir", default=None,
                        help="where weights are cached and looked up: a folder named like a repo "
                             "(e.g. kandinsky-2-2-decoder/) is used as is; default: the Hugging Face cache")
    parser.add_argument("--memory-budget", default="auto",
                        help="memory for loaded models, e.g. 12GB; least recently used models are unloaded "
                             "beyond it (default auto: 70%% of RAM)")
    parser.add_argument("--outputs-dir", default="outputs", help="where images are saved (default ./outputs)")
    parser.add_argument("--models", default="2.2,2.1,3",
                        help="the model families to offer, in order (the first is the default): any of 2.2, "
                             "2.1, 3, comma-separated (default 2.2,2.1,3)")
    parser.add_argument("--demo", action="store_true",
                        help="run on tiny random-weight models built locally (offline; images are noise)")
    parser.add_argument("--ray", metavar="ADDRESS", default=None,
                        help="run the models on the workers of a Ray cluster (docs/SCALING.md): auto (the cluster "
                             "running on this machine), local (start one here) or HOST:PORT of its head")
    parser.add_argument("--ray-cpu-workers", type=int, default=1, metavar="N",
                        help="with --ray: workers per CPU node, sharing its cores (default 1; each GPU or NPU "
                             "has its own worker)")
    parser.add_argument("--log-level", default="INFO")
    extra = shlex.split(os.environ.get("KANDINSKY_STUDIO_ARGS", ""))
    args = parser.parse_args(extra + list(sys.argv[1:] if argv is None else argv))
    args.families = parse_families(parser, args.models)
    return args


def parse_families(parser: argparse.ArgumentParser, text: str) -> list[str]:
    from backend.families import FAMILIES  # plain data: no MindSpore before the flags are checked

    families = [item.strip().removeprefix("kandinsky-").replace("-", ".") for item in text.split(",") if item.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        parser.error(f"--models: expected some of {', '.join(FAMILIES)} (comma-separated); got {text!r}")
    return list(dict.fromkeys(families))


def read_auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    pairs = list(args.auth)
    if args.auth_file:
        try:
            lines = Path(args.auth_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise SystemExit(f"--auth-file: cannot read {args.auth_file}: {error}") from None
        pairs += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    logins = []
    for pair in pairs:
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth/--auth-file: expected USER:PASSWORD, got {pair.split(':')[0]!r}:…")
        logins.append((user, password))
    return logins


def exposed(args: argparse.Namespace) -> bool:
    """Served beyond this machine: a share link or an address other than loopback."""
    from kandinsky_ui.sessions import is_loopback

    return args.share or not is_loopback(args.host)


def check_admins(args: argparse.Namespace, logins: list) -> None:
    users = {user for user, _ in logins}
    if args.admin and not logins:
        raise SystemExit("--admin: admins are --auth users; add --auth USER:PASSWORD (or --auth-file) for them")
    unknown = [user for user in args.admin if user not in users]
    if unknown:
        raise SystemExit(f"--admin: {', '.join(map(repr, unknown))} is not a --auth/--auth-file user "
                         f"(users: {', '.join(sorted(users))})")
    if args.max_jobs_per_user < 1:
        raise SystemExit(f"--max-jobs-per-user: must be 1 or more; got {args.max_jobs_per_user}")


def check_exposure(args: argparse.Namespace, logins: list) -> None:
    """Refuse to serve beyond this machine without a login unless told explicitly."""
    if not exposed(args) or logins:
        return
    if args.allow_unauthenticated:
        logger.warning("serving on %s without a login (--allow-unauthenticated)",
                       "a public share link" if args.share else args.host)
        return
    if os.environ.get("SPACE_ID"):
        logger.info("running as the Hugging Face Space %s: the Space's visibility controls access",
                    os.environ["SPACE_ID"])
        return
    where = "a public *.gradio.live link (--share)" if args.share else f"{args.host} (not loopback)"
    raise SystemExit(f"refusing to serve on {where} without a login: anyone who can reach it could use "
                     f"this machine. Add --auth USER:PASSWORD or --auth-file FILE, or pass "
                     f"--allow-unauthenticated if that is what you want.")


def secret_path(outputs_dir: Path) -> Path:
    return outputs_dir / ".browser-secret"


def browser_secret(outputs_dir: Path) -> str:
    """The key Gradio encrypts the browser's owner id with; kept so a restart keeps galleries.
    It lives in the outputs folder, which Gradio serves: launch() blocks it by name."""
    path = secret_path(outputs_dir)
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    secret = secrets.token_hex(16)
    path.write_text(secret, encoding="utf-8")
    path.chmod(0o600)
    return secret


def outputs_folder(text: str) -> Path:
    """--outputs-dir as a folder this process can write (made if missing), or a one-line SystemExit."""
    path = Path(text).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise SystemExit(f"--outputs-dir: {path} is a file, not a folder; give a folder this user can write "
                         f"(it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise SystemExit(f"--outputs-dir: cannot write images to {path}: {error.strerror or error}; give a "
                         f"folder this user can write (it is made if missing)") from None
    return path


def engine_config(args: argparse.Namespace):
    from backend.engine import EngineConfig
    from backend.memory import parse_memory

    try:
        budget = parse_memory(args.memory_budget)
    except ValueError as error:
        raise SystemExit(f"--memory-budget: {error}") from None
    return EngineConfig(families=tuple(args.families), demo=args.demo, device=args.device, dtype=args.dtype,
                        memory_budget=budget, models_dir=args.models_dir, max_per_owner=args.max_jobs_per_user,
                        offline=args.offline, outputs_dir=str(outputs_folder(args.outputs_dir)))


def ray_engine(args: argparse.Namespace):
    """--ray: the Engine's interface over the worker actors of a Ray cluster (backend/cluster.py).
    Ray is imported here only: without --ray the app never loads it."""
    from backend.cluster import ClusterEngine, ClusterError, connect

    config = engine_config(args)
    try:
        started = connect(args.ray)
        return ClusterEngine(config, cpu_workers_per_node=args.ray_cpu_workers, started_ray=started)
    except ClusterError as error:
        raise SystemExit(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logins = read_auth(args)
    check_admins(args, logins)
    check_exposure(args, logins)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"

    from PIL import Image

    from backend.engine import Engine, EngineConfig
    from backend.limits import MAX_INPUT_PIXELS
    from kandinsky_ui import CSS, build_ui, page_config
    from kandinsky_ui.headers import security_headers_middleware
    from kandinsky_ui.layout import OTHER_EVENTS
    from kandinsky_ui.login_guard import login_guard_middleware
    from kandinsky_ui.sessions import request_stamps_middleware

    # PIL refuses to open an image of more than twice this many pixels (a decompression bomb)
    # wherever it is opened; the upload checks (kandinsky_ui/guards.py) refuse beyond it exactly.
    Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
    engine = ray_engine(args) if args.ray else Engine(engine_config(args))
    outputs = engine.store.root
    capacity = EngineConfig.max_waiting + 1  # jobs the engine holds at once: the generation handlers' limit
    demo = build_ui(engine, page_config(engine.models, browser_secret(outputs), logins=bool(logins),
                                        admins=tuple(args.admin), local_admin=not exposed(args),
                                        engine_capacity=capacity))
    demo.queue(default_concurrency_limit=1)
    logger.info("device %s, dtype %s, outputs in %s%s", engine.device, engine.dtype_note, outputs,
                ", DEMO models" if args.demo else "")
    try:
        # Gradio serves uploads, its own cache and allowed_paths: the outputs folder (the gallery's
        # files, under unguessable owner ids), less the browser secret. No run history: the gallery
        # is the history, and its routes would talk to the Hugging Face Hub.
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=logins or None,
                    allowed_paths=[str(outputs)], blocked_paths=[str(secret_path(outputs))], css=CSS,
                    show_error=True, max_file_size=MAX_UPLOAD, footer_links=["api"], run_history=False,
                    # Gradio runs at most max_threads events at once (default 40, fewer than the jobs
                    # the engine takes); sync handlers also draw threads from a pool of this size
                    max_threads=capacity + OTHER_EVENTS,
                    # security headers on every response (kandinsky_ui/headers.py); each request's
                    # arrival time and each cancel, for Stop (kandinsky_ui/sessions.py); failed logins throttled, then
                    # locked with 429 (kandinsky_ui/login_guard.py)
                    app_kwargs={"middleware": [security_headers_middleware(), request_stamps_middleware(),
                                               *([login_guard_middleware(args.login_lockout)] if logins else [])]})
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
