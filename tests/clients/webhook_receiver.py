#!/usr/bin/env python3
"""A webhook receiver, as an operator's chat bridge or incident tool would run one:
Python's own http.server on loopback, appending every POSTed body to a file.

usage: webhook_receiver.py ADDR_FILE EVENTS_FILE FAIL_FIRST
Listens on a free port and writes `127.0.0.1:<port>` to ADDR_FILE. Answers the first
FAIL_FIRST requests 503 (to exercise retries), then 200, writing each accepted body as a
line of EVENTS_FILE.
"""
import http.server
import sys

addr_file, events_file, fail_first = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = 0


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global seen
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        seen += 1
        if seen <= fail_first:
            self.send_response(503)
            self.end_headers()
            return
        with open(events_file, "ab") as out:
            out.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
with open(addr_file + ".tmp", "w") as out:
    out.write(f"127.0.0.1:{server.server_address[1]}")
import os

os.rename(addr_file + ".tmp", addr_file)
server.serve_forever()
