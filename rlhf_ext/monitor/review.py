"""`rlhf-ext review OUTPUT_DIR`: a local web page where a person judges the samples the monitor flagged.

Workflow:

1. A PPO run with the monitor on appends suspicious samples to `OUTPUT_DIR/review/queue.jsonl`: each record pairs
   a flagged policy response with a reference-policy response to the same prompt (format: `monitor/queue.py`).
2. `rlhf-ext review OUTPUT_DIR` serves a page on 127.0.0.1 that shows one pair at a time, the two responses side by
   side in a random left/right order (so neither the position nor the label biases the reviewer). The reviewer
   picks the better one, marks both bad, or skips; every click is appended to `decisions.jsonl` (fsync'd) and
   `preferences.jsonl` is rewritten, so closing the browser or killing the server loses at most the pair on screen.
   The page polls, so pairs a running trainer appends show up without a reload.
3. `rlhf-ext reward --extra_preferences OUTPUT_DIR/review/preferences.jsonl` trains the next reward model on them.

Pending pairs come in queue order, or with `--order proxy_margin` the pairs where the reward prefers the flagged
response by the widest margin first (`queue.ORDERS`). Two reviewers on one folder (two servers) are shown different
pairs: each skips the pairs the other has on screen (`screens.py`).

HTTP API (JSON): `GET /api/state[?prefer=ID]` the next pending pairs, counts and the last decision;
`POST /api/decide {"id", "decision"}` with decision in flagged/reference/both_bad/skip; `POST /api/undo {"id"?}`.

The server is the standard library's, bound to 127.0.0.1 only. The page holds model output and the API writes
files, so it also refuses requests for a foreign Host (DNS rebinding) and POSTs from a foreign Origin (CSRF). Every
other user of the machine can reach 127.0.0.1 too: the API answers only requests that carry the server's random
token (header `X-Review-Token`), which the page reads from the `#token=` of the URL the server prints and opens.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import secrets
import shlex
import signal
import sys
import tempfile
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..integrity import CorruptFileError
from .queue import DECISIONS, ORDERS, ReviewQueue, check_order, plain_json, read_jsonl
from .screens import Screens

STATIC = Path(__file__).parent / "static"
FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/review.js": ("review.js", "text/javascript; charset=utf-8"),
         "/review.css": ("review.css", "text/css; charset=utf-8")}
MAX_BODY = 64 * 1024
# Seconds a connection may sit silent: a request whose body is shorter than its Content-Length would otherwise hold
# its thread forever. Browsers reconnect when an idle keep-alive connection is closed.
SOCKET_TIMEOUT = 15
PENDING_SHOWN = 3  # the page shows one pair; a few more let it say what comes next without another request
# No inline scripts or styles and nothing from elsewhere: even if a sample slipped into the DOM as markup, it
# could not run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
NO_QUEUE = ("No review queue at {path}.\nThe queue is filled by a PPO run with the monitor on: it appends flagged "
            "samples to OUTPUT_DIR/review/queue.jsonl. Pass that run's OUTPUT_DIR.")
# the run was there, its monitor on, and nothing was queued: nothing is missing, nothing needs fixing
NOTHING_QUEUED = ("Nothing to review in {output_dir}: its monitor flagged no sample for review (no detector whose "
                  "action is 'queue' fired{alarms}). Pairs appear in {path} when one does.")


def no_queue_message(output_dir) -> str:
    """Why `output_dir` has no review queue: a PPO run whose monitor queued nothing (it says so, and names the
    alarms it logged), or a folder that is no such run."""
    q = ReviewQueue(output_dir)
    monitor = Path(output_dir) / "monitor"
    if not (monitor / "run.json").is_file():
        return NO_QUEUE.format(path=q.queue_path)
    try:
        fired = sorted({f"{r['detector']} ({r['action']})" for r in read_jsonl(monitor / "alarms.jsonl")})
    except (OSError, CorruptFileError, KeyError):  # a damaged log: `rlhf-ext report` names that
        fired = []
    alarms = f"; alarms it logged: {', '.join(fired)}" if fired else ""
    return NOTHING_QUEUED.format(output_dir=output_dir, alarms=alarms, path=q.queue_path)


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class ReviewServer(ThreadingHTTPServer):
    """The HTTP server plus what the handlers share: the queue, the reviewer's name and a write lock."""

    daemon_threads = True  # a browser's open connection must not keep Ctrl-C from exiting

    def __init__(self, output_dir, port: int = 0, reviewer: str | None = None, order: str = "queue",
                 token: str | None = None):
        self.order = check_order(order)  # before binding: a bad order or a damaged queue must not leave a port open
        self.queue = ReviewQueue(output_dir)
        self.queue.pending(self.order)  # reads and checks every file the page needs (CorruptFileError)
        self.queue.sweep()  # temporary files of a server killed mid-export
        if self.queue.decisions_path.is_file():  # a server killed between recording a decision and rewriting
            self.queue.export_preferences()  # preferences.jsonl left it stale, and no later click might repair it
        super().__init__(("127.0.0.1", port), Handler)
        self.reviewer = reviewer
        self.screens = Screens(self.queue.dir, reviewer)  # two servers on one folder show different pairs
        # what the API asks of every request: any local user can connect to 127.0.0.1, only the reviewer has this
        self.token = token or secrets.token_urlsafe(24)
        # decide/undo each append and then rewrite preferences.jsonl via one shared temporary file: one at a time
        self.lock = threading.Lock()
        self.reported = None  # the last damaged-file error printed to the terminal
        self.port = self.server_address[1]
        self.allowed_hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
        if self.port == 80:  # browsers leave the default port out of Host
            self.allowed_hosts |= {"127.0.0.1", "localhost"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def page_url(self) -> str:
        """The URL to open: the page reads the token from its fragment (never sent to the server, nor in its logs)."""
        return f"{self.url}#token={self.token}"

    def server_close(self):
        if hasattr(self, "screens"):  # not when binding the port failed, inside __init__
            self.screens.close()
        super().server_close()

    def handle_error(self, request, client_address):
        # a browser that closed its tab or connection mid-reply is routine: no traceback in the reviewer's terminal
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def state(self, prefer: str | None = None) -> dict:
        q = self.queue
        # the pair on screen (or the one just undone) stays first, whatever else was decided meanwhile, unless another
        # reviewer's server showed it first: pairs other servers on this folder have on screen go last
        pending = self.screens.arrange(q.pending(self.order), prefer)
        return {"pending": pending[:PENDING_SHOWN], "counts": q.progress(), "last": q.last_decision(self.reviewer),
                "preferences_path": str(q.preferences_path), "reviewer": self.reviewer, "order": self.order}

    def decide(self, body: dict) -> dict:
        pair_id, decision = body.get("id"), body.get("decision")
        if not isinstance(pair_id, str) or not pair_id:
            raise ApiError(HTTPStatus.BAD_REQUEST, 'decide needs "id": the pair\'s id (a string).')
        if decision not in DECISIONS:
            raise ApiError(HTTPStatus.BAD_REQUEST, f'"decision" must be one of {", ".join(DECISIONS)}; got {decision!r}.')
        with self.lock, self.queue.locked():  # this server's threads, and other servers on the folder
            if pair_id not in {r["id"] for r in self.queue.records()}:
                raise ApiError(HTTPStatus.NOT_FOUND, f"No pair {pair_id!r} in the queue.")
            # a second tab (or a double click) must not silently overwrite a decision: undo first
            if pair_id in self.queue.decisions():
                raise ApiError(HTTPStatus.CONFLICT, f"Pair {pair_id!r} is already decided; undo it to change it.")
            self.queue.decide(pair_id, decision, reviewer=self.reviewer)
        return self.state()

    def undo(self, body: dict) -> dict:
        pair_id = body.get("id")
        if pair_id is not None and not isinstance(pair_id, str):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"id" must be a string (or left out to undo the last decision).')
        with self.lock, self.queue.locked():  # this server's threads, and other servers on the folder
            decided = self.queue.decisions()
            if pair_id is None:
                last = self.queue.last_decision(self.reviewer)  # this reviewer's, not another server's
                if last is None:
                    raise ApiError(HTTPStatus.CONFLICT, "Nothing to undo" + (f" by {self.reviewer}." if self.reviewer
                                                                            else "."))
                pair_id = last["id"]
            elif pair_id not in decided:
                raise ApiError(HTTPStatus.CONFLICT, f"Pair {pair_id!r} has no decision to undo (undone already, in "
                                                    f"another tab?).")
            self.queue.undo(pair_id, reviewer=self.reviewer)
        return {**self.state(prefer=pair_id), "undone": pair_id}


class Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "rlhf-ext-review"
    timeout = SOCKET_TIMEOUT

    def do_GET(self):
        self._handle(self._get)

    def do_HEAD(self):  # what a GET would answer, without the body (`_send`)
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def _handle(self, route):
        try:
            self._check_host()
            route()
        except (ConnectionError, TimeoutError):  # the client left (or went silent) mid-request: nobody to answer
            self.close_connection = True
        except ApiError as e:
            self._json({"error": str(e)}, e.status)
        except CorruptFileError as e:  # a file damaged while the page is open: say which line, in the page and here
            if str(e) != self.server.reported:  # once, not at every poll of the page
                self.server.reported = str(e)
                self.log_error("%s", e)
            self._json({"error": str(e)}, HTTPStatus.INTERNAL_SERVER_ERROR)
        except Exception as e:  # one bad request must not take the page down; say what happened
            self.log_error("%s %s failed: %r", self.command, self.path, e)
            self._json({"error": f"Internal error: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _check_host(self):
        if self.headers.get("Host", "").lower() not in self.server.allowed_hosts:
            raise ApiError(HTTPStatus.FORBIDDEN, "Unexpected Host header: open the page at " + self.server.url)

    def _check_token(self):
        given = self.headers.get("X-Review-Token", "")
        if not hmac.compare_digest(given.encode(), self.server.token.encode()):
            raise ApiError(HTTPStatus.FORBIDDEN, "Missing or wrong review token: open the page at the URL `rlhf-ext "
                                                 "review` printed (the one ending in #token=...).")

    def _get(self):
        url = urlsplit(self.path)
        if url.path == "/api/state":
            self._check_token()
            prefer = parse_qs(url.query).get("prefer", [None])[0]
            return self._json(self.server.state(prefer))
        if url.path == "/favicon.ico":  # keeps the browser console free of a 404
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if url.path not in FILES:
            raise ApiError(HTTPStatus.NOT_FOUND, f"No such page: {url.path}")
        name, ctype = FILES[url.path]
        self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), ctype)

    def _post(self):
        routes = {"/api/decide": self.server.decide, "/api/undo": self.server.undo}
        path = urlsplit(self.path).path
        if path not in routes:
            raise ApiError(HTTPStatus.NOT_FOUND, f"No such endpoint: POST {path}")
        origin = self.headers.get("Origin")
        if origin is not None and origin != "http://" + self.headers["Host"].lower():
            raise ApiError(HTTPStatus.FORBIDDEN, f"Requests from {origin} are not allowed.")
        self._check_token()
        self._json(routes[path](self._read_json()))

    def _read_json(self) -> dict:
        # JSON only: a cross-site form post cannot send this type without a CORS preflight, which we never grant
        if self.headers.get_content_type() != "application/json":
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Send the request body as application/json.")
        given = self.headers.get("Content-Length", "").strip()
        if not given.isascii() or not given.isdigit():  # int() would take "-1", "1_0", " 10"
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "A Content-Length header (a whole number of bytes) is "
                                                       "required.")
        length = int(given)
        if length > MAX_BODY:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"The request body is limited to {MAX_BODY} bytes.")
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True  # the rest of the body may still come: the stream is out of step
            raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"The request body did not arrive: Content-Length says {length} "
                                                       f"bytes; send that many.") from None
        if len(raw) < length:  # the client closed its side early
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, f"The request body ended after {len(raw)} of the {length} bytes its "
                                                   f"Content-Length announced.")
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
            raise ApiError(HTTPStatus.BAD_REQUEST, f"The request body is not valid JSON: {e}") from None
        except RecursionError:  # nested deeper than the parser's stack: no request of this API looks like that
            raise ApiError(HTTPStatus.BAD_REQUEST, "The request body is nested too deeply: send a flat JSON object "
                                                   'such as {"id": ..., "decision": ...}.') from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "The request body must be a JSON object.")
        return body

    def _json(self, obj, status=HTTPStatus.OK):
        # NaN/Infinity (a queue written before they became null) would make the browser's JSON.parse refuse the
        # whole reply, and a lone surrogate the encoding fail: null and U+FFFD. Encoded in full before anything is sent.
        data = json.dumps(plain_json(obj), ensure_ascii=False, allow_nan=False).encode()
        self._send(status, data, "application/json; charset=utf-8")

    def _send(self, status, data: bytes, ctype: str):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # the page polls every few seconds; a line per request would bury the URL and real errors

    def log_error(self, format, *args):
        if format.startswith("Request timed out"):  # an idle browser connection closed after SOCKET_TIMEOUT: routine
            return
        sys.stderr.write("review: " + (format % args) + "\n")


def check_queue(output_dir) -> ReviewQueue:
    q = ReviewQueue(output_dir)
    if not q.queue_path.is_file():
        raise FileNotFoundError(no_queue_message(output_dir))
    return q


def serve(output_dir, port: int = 0, reviewer: str | None = None, order: str = "queue", token: str | None = None):
    """Start the review server in a background thread; returns `(server, url)`. Stop it with `server.shutdown()`
    and `server.server_close()`. Port 0 picks a free port; `order`: which pending pair comes first (`ORDERS`).
    The API wants `server.token` in an `X-Review-Token` header (`token`: that string, else a random one); a browser
    opens `server.page_url`."""
    check_queue(output_dir)
    server = ReviewServer(output_dir, port, reviewer, order, token)
    # a short poll interval: shutdown() waits for the loop to notice, and tests start and stop many servers
    threading.Thread(target=server.serve_forever, args=(0.1,), name="rlhf-ext-review", daemon=True).start()
    return server, server.url


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535; 0: any free port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range: a port is 0 to 65535 (0: any free port)")
    return port


def _open_browser(url: str, folder) -> Path:
    """Open `url` through a file only this user can read that redirects to it: a URL on the browser's command line
    (webbrowser.open) is visible to every user of the machine in `ps`, and this one carries the token. The file goes
    in `folder` (the run's review/ folder), not /tmp: a snap-packaged browser (Ubuntu's Firefox and Chromium) has a
    private /tmp and would show "file not found"."""
    fd, path = tempfile.mkstemp(prefix="open-review-page-", suffix=".html", dir=folder)  # mode 0600
    path = Path(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={url}">'
                    f'<a href="{url}">Open the review page</a>')
        webbrowser.open(path.as_uri())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path  # removed when the server stops (the browser has read it by then)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-ext review", description=__doc__.split("\n\n")[0],
                                 epilog="Files: OUTPUT_DIR/review/{queue,decisions,preferences}.jsonl")
    ap.add_argument("output_dir", help="the PPO run's output_dir (its review/queue.jsonl is read)")
    ap.add_argument("--port", type=_port, default=0, help="port on 127.0.0.1 (default 0: any free port)")
    ap.add_argument("--no-browser", action="store_true", help="print the URL only, do not open a browser")
    ap.add_argument("--reviewer", default=None, help="name recorded with each decision")
    ap.add_argument("--order", choices=ORDERS, default="queue",
                    help="which pending pair comes first: queue (as the monitor queued them) or proxy_margin (the "
                         "pairs where the reward prefers the flagged response by the widest margin: where it is most "
                         "confidently wrong, if you disagree with it)")
    args = ap.parse_args(argv)
    try:
        queue = check_queue(args.output_dir)
        server = ReviewServer(args.output_dir, args.port, args.reviewer, args.order)
    except (FileNotFoundError, CorruptFileError) as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"Cannot listen on 127.0.0.1:{args.port}: {e}", file=sys.stderr)
        return 2
    p = queue.progress()
    first = "" if args.order == "queue" else f", {args.order} first"
    print(f"Reviewing {queue.queue_path}: {p['pending']} of {p['total']} pairs pending{first}.", flush=True)
    print(f"Review page: {server.page_url}   (Ctrl-C to stop; every decision is saved as you click)", flush=True)
    opener = None
    if not args.no_browser:
        try:
            opener = _open_browser(server.page_url, queue.queue_path.parent)
            print("(If the browser shows no review page, open the URL above: the page needs its #token=.)", flush=True)
        except Exception:  # no browser on this machine: the printed URL is enough
            pass
    def stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C or a `kill` (SIGTERM) both end the server cleanly — also when started from a shell that set SIGINT to
    # "ignore" for background jobs, which Python would otherwise inherit.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if opener is not None:
            opener.unlink(missing_ok=True)
    try:
        p = queue.progress()
    except CorruptFileError as e:  # damaged while the page was open; every decision made is in decisions.jsonl
        print(f"\nStopped. {e}", file=sys.stderr)
        return 2
    print(f"\nStopped. {p['decided']} of {p['total']} pairs reviewed; {p['preferences']} preference pairs in "
          f"{queue.preferences_path}")
    if p["preferences"]:
        print(f"Next, train the reward model with them: rlhf-ext reward --config REWARD_CONFIG --extra_preferences "
              f"{shlex.quote(str(queue.preferences_path))} (README: \"Reward hacking: monitor → review → retrain → resume\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
