"""The classic Flask hello world, plus a page that asks another service."""

import os
import urllib.request

from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    replica = os.environ.get("CAPSTAN_REPLICA", "?")
    return f"Hello from Flask, replica {replica}\n"


@app.route("/healthz")
def healthz():
    return "ok\n"


@app.route("/visits")
def visits():
    # The database-like service, reached by its service name.
    with urllib.request.urlopen("http://db:6000/incr", timeout=5) as r:
        count = r.read().decode().strip()
    return f"visits: {count}\n"


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "5000")))
