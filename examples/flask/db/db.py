"""A tiny database-like service: a counter kept in /data, a named volume."""

import http.server
import os
import threading

PATH = "/data/visits"
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/incr":
            with LOCK:
                n = int(open(PATH).read()) + 1 if os.path.exists(PATH) else 1
                with open(PATH + ".tmp", "w") as f:
                    f.write(str(n))
                os.replace(PATH + ".tmp", PATH)
            body = f"{n}\n".encode()
        elif self.path == "/healthz":
            body = b"ok\n"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(fmt % args, flush=True)


http.server.ThreadingHTTPServer(("0.0.0.0", 6000), Handler).serve_forever()
