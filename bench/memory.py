"""Memory under large responses: RSS of provider-host while 8 clients list 1,000 keys of 64 KB
and 4 bulk-read 100 of them for 10 s, then after 30 s idle. Driven by bench/memory.sh."""
import json
import sys
import threading
import time
import urllib.request

port, token, pid = sys.argv[1], sys.argv[2], sys.argv[3]


def post(action, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/providers/kv/{action}",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def rss_mb():
    with open(f"/proc/{pid}/status") as f:
        line = next(l for l in f if l.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


for i in range(1000):
    post("set", {"key": f"k{i:04}", "value": "x" * 65000})
sizes = []


def worker(action, body):
    end = time.time() + 10
    while time.time() < end:
        sizes.append(len(post(action, body)))


threads = [threading.Thread(target=worker, args=("list", {"limit": 1000})) for _ in range(8)]
threads += [
    threading.Thread(target=worker, args=("bulk_get", {"keys": [f"k{i:04}" for i in range(100)]}))
    for _ in range(4)
]
for t in threads:
    t.start()
peak = 0
while any(t.is_alive() for t in threads):
    peak = max(peak, rss_mb())
    time.sleep(0.1)
time.sleep(30)
print(f"{len(sizes)} {max(sizes)} {peak} {rss_mb()}")
