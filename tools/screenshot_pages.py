"""Screenshots of pages of a built site in headless Chromium, and what the browser saw on them.

    python tools/screenshot_pages.py _build/html book/notation notebooks/02_intuition --offline
    python tools/screenshot_pages.py _build/html notebooks/02_intuition --offline --selector .lk-frames \\
        --step "const s = document.querySelector('.lk-frames input[type=range]'); s.value = 4; \\
                s.dispatchEvent(new Event('input'))"

The site is served from a local HTTP server on 127.0.0.1 (or opened as file:// URLs with
``--file``). Each PAGE (a path under the site, ``.html`` optional) is loaded, waited on until its
MathJax has typeset, and saved as OUT/<page>.png; with ``--selector`` the picture is clipped to
the first element that matches. Each ``--step`` is JavaScript run in the page afterwards, followed
by one more picture, OUT/<page>-<n>.png: a way to move a control and see what it changes.

``--offline`` cuts the browser off every host but the local server: host names resolve to nothing
and every request to another origin is failed before it leaves (the DevTools Fetch domain), so a
page shows only what the site itself serves. For each page the script prints one line: how many
math elements MathJax typeset out of how many Sphinx wrote (``.math``), MathJax errors, widget
views rendered, the requests that left the site (blocked ones when offline), and JavaScript errors.

Exit status 1 when a page failed to load, threw a JavaScript error (other than those named by
``--allow-js-error``), left math untypeset, showed a MathJax error, or sent a request off the site
(unless ``--allow-external``); 0 otherwise.

Chromium talks to this script over ``--remote-debugging-pipe`` (file descriptors 3 and 4), so it
needs nothing but the standard library and a ``chromium`` (Debian: ``apt-get install chromium``).
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: What the page reports after loading: typeset math, MathJax errors, rendered widget views.
PAGE_REPORT_JS = """(() => ({
    math: document.querySelectorAll('.math').length,
    typeset: Array.from(document.querySelectorAll('.math'))
                  .filter(el => el.querySelector('mjx-container')).length,
    mathjax_errors: document.querySelectorAll('mjx-merror').length,
    widget_views: document.querySelectorAll('.widget-subarea > *').length,
}))()"""

#: Resolves once MathJax (if the page loads it) has typeset the page.
MATHJAX_DONE_JS = """(window.MathJax && MathJax.startup && MathJax.startup.promise)
    ? MathJax.startup.promise.then(() => true) : Promise.resolve(false)"""


class Chromium:
    """A headless Chromium driven through the DevTools protocol over a pipe (fds 3 and 4).

    ``call(method, params, session)`` sends one command and returns its result; the events that
    arrive meanwhile are kept in ``events`` (one list per session id). With ``block_external``
    set, every paused request (Fetch domain) whose URL does not start with it is failed.
    ``offline`` makes every host name resolve to nothing (127.0.0.1 is reached by address).
    """

    def __init__(self, executable: str, *, offline: bool, width: int, height: int):
        self._profile = tempfile.mkdtemp(prefix="screenshot-pages-")     # a fresh browser profile
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        flags = ["--headless", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--window-size={width},{height}",
                 f"--user-data-dir={self._profile}"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")              # Chromium refuses to sandbox as root
        if offline:
            flags.append("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")

        def wire_pipes():                             # in the child: the pipe ends become fds 3, 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._process = subprocess.Popen([executable, *flags, "about:blank"], pass_fds=(3, 4),
                                         preexec_fn=wire_pipes, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: dict[str | None, list[dict]] = {}
        self.block_external: str | None = None
        self.width, self.height = width, height

    def _send(self, method: str, params: dict, session: str | None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _handle_event(self, message: dict) -> None:
        if "method" not in message:                  # the answer to a command nobody waits for
            return
        session = message.get("sessionId")
        if message["method"] == "Fetch.requestPaused":
            request = message["params"]
            url = request["request"]["url"]
            if self.block_external is None or url.startswith(self.block_external):
                self._send("Fetch.continueRequest", {"requestId": request["requestId"]}, session)
            else:
                self._send("Fetch.failRequest", {"requestId": request["requestId"],
                                                 "errorReason": "InternetDisconnected"}, session)
        self.events.setdefault(session, []).append(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        """Send ``method`` and wait for its answer; raise RuntimeError on a protocol error."""
        wanted = self._send(method, params or {}, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if "method" in message:
                self._handle_event(message)
            elif message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})

    def wait_for(self, event: str, session: str, timeout: float) -> dict:
        """Wait for the next ``event`` of ``session`` (one already received counts)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.events.get(session, [])):
                if message["method"] == event:
                    return self.events[session].pop(i)
            self._handle_event(self._receive(deadline))

    def drain(self, seconds: float) -> None:
        """Keep answering paused requests and collecting events for ``seconds``."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self._handle_event(self._receive(deadline))
        except TimeoutError:
            pass

    def open(self, url: str, timeout: float = 60.0) -> tuple[str, str]:
        """Load ``url`` in a new tab of the window's size and wait for its load event.

        Returns the tab's target id and DevTools session id; RuntimeError if the page fails to
        load.  With ``block_external`` set, the tab's requests go through the Fetch domain.
        """
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", {}, session)
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False}, session)
        if self.block_external is not None:
            self.call("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}, session)
        navigation = self.call("Page.navigate", {"url": url}, session)
        if navigation.get("errorText"):
            raise RuntimeError(f"{url}: {navigation['errorText']}")
        self.wait_for("Page.loadEventFired", session, timeout)
        return target, session

    def evaluate(self, expression: str, session: str, timeout: float = 60.0):
        """The value of a JavaScript expression in the page (promises awaited; as in the DevTools
        console, a ``const`` may be declared again by a later expression)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "replMode": True},
                           session, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"JavaScript error: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self._send("Browser.close", {}, None)
            self._process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        shutil.rmtree(self._profile, ignore_errors=True)


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A quiet HTTP server for ``site`` on a free port of 127.0.0.1, running in a thread."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


#: Scrolls the element to the top of the window at once and hides what floats over the page (the
#: theme's sticky header, fixed banners), so a picture of the element shows the element; returns
#: its height, or null when no element matches.
ELEMENT_TO_TOP_JS = """((selector) => {
    const el = document.querySelector(selector);
    if (!el) return null;
    document.documentElement.style.scrollBehavior = 'auto';
    for (const other of document.querySelectorAll('body *')) {
        const position = getComputedStyle(other).position;
        if ((position === 'fixed' || position === 'sticky') && !other.contains(el))
            other.style.visibility = 'hidden';
    }
    el.scrollIntoView({block: 'start'});
    return el.getBoundingClientRect().height;
})"""

#: The element's rectangle in the window (CSS pixels).
ELEMENT_BOX_JS = """((selector) => {
    const r = document.querySelector(selector).getBoundingClientRect();
    return {x: r.left, y: r.top, width: r.width, height: r.height};
})"""


def screenshot(browser: Chromium, session: str, path: Path, selector: str | None) -> None:
    """Save the window (or, with ``selector``, the first element that matches) as a PNG."""
    params = {"format": "png"}
    if selector is not None:
        height = browser.evaluate(f"{ELEMENT_TO_TOP_JS}({json.dumps(selector)})", session)
        if not height:
            raise RuntimeError(f"no visible element matches --selector {selector!r}")
        if height > browser.height:               # a window tall enough to hold the element
            browser.call("Emulation.setDeviceMetricsOverride", {
                "width": browser.width, "height": int(height) + 1, "deviceScaleFactor": 1,
                "mobile": False}, session)
            browser.evaluate(f"{ELEMENT_TO_TOP_JS}({json.dumps(selector)})", session)
        box = browser.evaluate(f"{ELEMENT_BOX_JS}({json.dumps(selector)})", session)
        page = browser.call("Page.getLayoutMetrics", {}, session)["cssVisualViewport"]
        params["clip"] = {"x": box["x"] + page["pageX"], "y": box["y"] + page["pageY"],
                          "width": box["width"], "height": box["height"], "scale": 1}
    path.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", params, session)["data"]))


def visit(browser: Chromium, base: str, page: str, out: Path, args) -> tuple[dict, list[str]]:
    """Load one page, take its pictures, and return its report and its problems."""
    url = base + (page if page.endswith(".html") else page + ".html")
    target, session = browser.open(url, args.timeout)
    problems = []
    browser.evaluate(MATHJAX_DONE_JS, session, args.timeout)
    browser.drain(args.settle)

    name = page.removesuffix(".html").replace("/", "__")
    shots = [out / f"{name}.png"]
    screenshot(browser, session, shots[0], args.selector)
    for n, step in enumerate(args.step, start=1):
        browser.evaluate(step, session, args.timeout)
        browser.drain(args.settle)
        shots.append(out / f"{name}-{n}.png")
        screenshot(browser, session, shots[-1], args.selector)

    report = {"page": page, **browser.evaluate(PAGE_REPORT_JS, session), "external": [], "js_errors": []}
    local = base if base.startswith("http") else "file://"
    for event in browser.events.pop(session, []):
        if event["method"] == "Network.requestWillBeSent":
            request_url = event["params"]["request"]["url"]
            if not request_url.startswith((local, "data:", "blob:", "about:")):
                report["external"].append(request_url)
        elif event["method"] == "Runtime.exceptionThrown":
            details = event["params"]["exceptionDetails"]
            report["js_errors"].append(details.get("exception", {}).get("description", details.get("text")))
    report["shots"] = [str(s) for s in shots]
    browser.call("Target.closeTarget", {"targetId": target})

    if report["typeset"] < report["math"]:
        problems.append(f"{report['math'] - report['typeset']} of {report['math']} math elements not typeset")
    if report["mathjax_errors"]:
        problems.append(f"{report['mathjax_errors']} MathJax error(s)")
    problems += [f"JavaScript error: {error}" for error in report["js_errors"]
                 if not any(allowed in error for allowed in args.allow_js_error)]
    if report["external"] and not args.allow_external:
        problems.append(f"{len(report['external'])} request(s) left the site")
    return report, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("site", type=Path, help="the built site, e.g. _build/html")
    parser.add_argument("pages", nargs="+", help="pages under the site, e.g. book/notation")
    parser.add_argument("--out", type=Path, default=Path("_build/screenshots"), help="folder for the PNGs")
    parser.add_argument("--offline", action="store_true", help="block every host but the local server")
    parser.add_argument("--file", action="store_true", help="open file:// URLs instead of serving the site")
    parser.add_argument("--selector", help="clip each picture to the first element matching this CSS selector")
    parser.add_argument("--step", action="append", default=[],
                        help="JavaScript to run after the first picture; one more picture follows (repeatable)")
    parser.add_argument("--allow-external", action="store_true",
                        help="online: do not count requests that leave the site as problems")
    parser.add_argument("--allow-js-error", action="append", default=[], metavar="TEXT",
                        help="a JavaScript error whose message contains TEXT is reported, not a problem "
                             "(repeatable)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait after MathJax and after each step (widgets render late)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a page to load")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the browser executable (default: chromium on PATH)")
    args = parser.parse_args()

    if not (args.site / "index.html").is_file():
        raise ValueError(f"site must be a built site with an index.html, got {args.site}")
    if args.chromium is None:
        raise ValueError("chromium not found: install it (apt-get install chromium) or pass --chromium")
    for page in args.pages:
        if not (args.site / (page if page.endswith(".html") else page + ".html")).is_file():
            raise ValueError(f"pages: no {page} under {args.site}")
    args.out.mkdir(parents=True, exist_ok=True)

    # the browser first: its launch (preexec_fn) must not run beside the server's thread
    browser = Chromium(args.chromium, offline=args.offline, width=args.width, height=args.height)
    server = None
    try:
        if args.file:
            base = args.site.resolve().as_uri() + "/"
        else:
            server, base = serve(args.site)
        browser.block_external = (base if not args.file else "file://") if args.offline else None
        failed = 0
        for page in args.pages:
            report, problems = visit(browser, base, page, args.out, args)
            blocked = " (blocked)" if args.offline else ""
            print(f"{'✗' if problems else '✓'} {page}: math typeset {report['typeset']}/{report['math']}, "
                  f"MathJax errors {report['mathjax_errors']}, widget views {report['widget_views']}, "
                  f"requests off the site {len(report['external'])}{blocked}, "
                  f"JS errors {len(report['js_errors'])} → {', '.join(report['shots'])}")
            for url in report["external"]:
                print(f"    off the site{blocked}: {url}")
            for problem in problems:
                print(f"    problem: {problem}")
            failed += bool(problems)
    finally:
        browser.close()
        if server is not None:
            server.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
