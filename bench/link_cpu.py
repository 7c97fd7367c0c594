"""What moving a tensor across an emulated link costs the machine's cores (testbed/netns.sh).

    sudo python3 bench/link_cpu.py [--mb 2.7] [--times 400]

Two emulated hosts joined by uncapped veth: one sends a tensor of --mb megabytes --times times
over one TCP connection (TCP_NODELAY, as dtrain's lanes) into the other's single buffer (one copy
into the kernel, one out, as a lane does). Reports the wall time and how long all the machine's
cores were busy (/proc/stat: both processes and the kernel's TCP work for them; the processes'
start-up is outside the window), per tensor. On veth the kernel's work for both ends of a connection
runs on the sender's core, so on a machine whose cores also compute, this is what every hop of
parameters or sums takes from the computing.
"""
import argparse
import os
import socket
import subprocess
import sys
import time

from multihost import NETNS, busy_seconds

PORT = 50060


def receive(size, times):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", PORT))
    s.listen(1)
    s.settimeout(30)
    print("ready", flush=True)
    c, _ = s.accept()
    c.settimeout(30)
    view = memoryview(bytearray(size))
    total, got = size * times, 0
    while got < total:
        n = c.recv_into(view[: min(size, total - got)])
        if n == 0:
            raise SystemExit(f"the sender closed after {got} of {total} bytes")
        got += n
    c.sendall(b"k")


def send(address, size, times):
    for _ in range(100):
        try:
            c = socket.create_connection((address, PORT), timeout=30)
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise SystemExit("the receiver never listened")
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.settimeout(30)
    tensor = bytes(size)
    c.sendall(tensor)  # the connection's first tensor, outside the window
    time.sleep(0.2)
    busy0, t0 = busy_seconds(), time.perf_counter()
    for _ in range(times - 1):
        c.sendall(tensor)
    if c.recv(1) != b"k":
        raise SystemExit("no acknowledgement")
    wall, busy = time.perf_counter() - t0, busy_seconds() - busy0
    per = times - 1
    print(f"{per} tensors of {size / 1e6:.1f} MB over uncapped veth: {wall / per * 1e3:.2f} ms each, "
          f"{busy / per * 1e3:.2f} ms of the cores' time each ({size * per / wall / 1e9:.2f} GB/s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=2.7, help="the tensor's size (the wide job's parameters: 2.7)")
    ap.add_argument("--times", type=int, default=400)
    ap.add_argument("--role", default="", help=argparse.SUPPRESS)
    ap.add_argument("--to", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    size = int(a.mb * 1e6)
    if a.role == "receive":
        return receive(size, a.times)
    if a.role == "send":
        return send(a.to, size, a.times)
    bed = f"lc{os.getpid()}"
    subprocess.run([NETNS, "up", bed, "2"], check=True)
    receiver = None
    try:
        me = [sys.executable, os.path.abspath(__file__), "--mb", str(a.mb), "--times", str(a.times)]
        receiver = subprocess.Popen([NETNS, "exec", bed, "1"] + me + ["--role", "receive"], stdout=subprocess.PIPE,
                                    text=True)
        if receiver.stdout.readline().strip() != "ready":
            raise SystemExit("the receiver failed")
        subprocess.run([NETNS, "exec", bed, "0"] + me + ["--role", "send", "--to", "10.250.0.2"], check=True,
                       timeout=300)
        receiver.wait(timeout=60)
    finally:
        if receiver is not None and receiver.poll() is None:
            receiver.kill()
        subprocess.run([NETNS, "down", bed], check=False)


if __name__ == "__main__":
    main()
