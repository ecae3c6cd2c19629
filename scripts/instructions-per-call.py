#!/usr/bin/env python3
"""Instructions per call of an embedded dispatcher, counted by callgrind.

Time-based figures move by 20 % between runs on a shared two-core machine; an instruction
count does not depend on what else the machine does. This runs `dispatcher serve` (SQLite, the
in-memory bus) under `valgrind --tool=callgrind`, enrolls a real `host-agent`, makes 50 warm-up
calls of the `stat` tool one at a time, zeroes the counters, makes N more, waits out the call
log's linger (its batch is part of the calls' cost) and dumps. Every thread of the dispatcher is
counted: the runtime's workers, the SQLite worker, the stall watch.

    scripts/instructions-per-call.py target/release/dispatcher target/release/host-agent [N]

Needs valgrind (`callgrind_control`). Prints the instructions per call and the dump's path, for
`callgrind_annotate --inclusive=yes <dump>`.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

WARM_UP = 50
CALL = {"tool": "stat", "input": {"path": "."}, "timeoutMs": 60000}


class Api:
    """One keep-alive connection to the dispatcher, reopened when it drops."""

    def __init__(self, port, token):
        self.port, self.token, self.conn = port, token, None

    def request(self, method, path, body=None):
        for _ in range(5):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                headers = {"Authorization": f"Bearer {self.token}"}
                data = None
                if body is not None:
                    data = json.dumps(body)
                    headers["Content-Type"] = "application/json"
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn = None
                time.sleep(0.5)
        raise RuntimeError(f"{method} {path}: no answer")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    dispatcher, agent = sys.argv[1], sys.argv[2]
    calls = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    work = tempfile.mkdtemp(prefix="instructions-")
    database = f"sqlite://{work}/dispatcher.db?mode=rwc"
    env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
    created = subprocess.run(
        [dispatcher, "token", "create", "--user", "bench", "--database-url", database],
        env=env, capture_output=True, text=True, check=True,
    )
    token = created.stdout.strip().splitlines()[-1]
    port = free_port()
    dump = f"{work}/callgrind.out"
    log = open(f"{work}/dispatcher.log", "w")
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", dispatcher, "serve",
         "--listen", f"127.0.0.1:{port}", "--database-url", database],
        env=env, stdout=log, stderr=log,
    )
    api = Api(port, token)
    device_agent = None
    try:
        deadline = time.time() + 180
        while True:
            try:
                if api.request("GET", "/healthz")[0] == 200:
                    break
            except RuntimeError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the dispatcher did not start")
            time.sleep(0.5)
        status, body = api.request("POST", "/api/pairing-codes", {})
        assert status == 201, (status, body)
        code = json.loads(body)["code"]
        root = f"{work}/root"
        os.makedirs(root)
        agent_log = open(f"{work}/agent.log", "w")
        device_agent = subprocess.Popen(
            [agent, "run", "--server", f"http://127.0.0.1:{port}", "--code", code, "--root", root,
             "--credentials-dir", f"{work}/credentials", "--credentials-store", "file", "--name", "bench"],
            env=dict(env, RUST_LOG="warn"), stdout=agent_log, stderr=agent_log,
        )
        device = None
        while device is None:
            if time.time() > deadline + 60:
                raise RuntimeError("the device did not come online")
            status, body = api.request("GET", "/api/devices")
            listed = json.loads(body)
            listed = listed.get("devices", listed) if isinstance(listed, dict) else listed
            online = [d for d in listed if d.get("online")]
            device = online[0]["id"] if online else None
            time.sleep(0.5)
        path = f"/api/devices/{device}/calls"
        for _ in range(WARM_UP):
            status, body = api.request("POST", path, CALL)
            assert status == 200, (status, body)
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True)
        for _ in range(calls):
            status, body = api.request("POST", path, CALL)
            assert status == 200, (status, body)
        time.sleep(0.3)
        subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True)
    finally:
        if device_agent is not None:
            device_agent.terminate()
            device_agent.wait()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    # The dump taken on request is the first numbered part.
    part = f"{dump}.1"
    total = next(int(line.split()[1]) for line in open(part) if line.startswith("summary:"))
    print(f"instructions per call: {total / calls:,.0f} ({calls} calls of stat through host-agent)")
    print(f"dump: {part}")


if __name__ == "__main__":
    main()
