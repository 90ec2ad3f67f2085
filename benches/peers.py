#!/usr/bin/env python3
"""Reference echo servers for `cargo bench`: Python's socketserver, the
design echo-forkd comes from.

    python3 benches/peers.py forking|threading|udp

Binds 127.0.0.1:0, prints the port on stdout, serves until killed. Each is
the stock class with its queue and child limits raised so that it can carry
the benchmark's 50 concurrent clients (the stock listen backlog of 5 and
ForkingTCPServer's 40 children would make it refuse or stall instead);
`udp` is the stock UDPServer answering each datagram with its bytes.
"""

import socket
import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        recv, sendall = self.request.recv, self.request.sendall
        while True:
            data = recv(65536)
            if not data:
                return
            sendall(data)


class UdpEcho(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data, self.client_address)


class Forking(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = 1024
    max_children = 1024


class Threading(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    request_queue_size = 1024
    daemon_threads = True


def main():
    kinds = {
        "forking": (Forking, Echo),
        "threading": (Threading, Echo),
        "udp": (socketserver.UDPServer, UdpEcho),
    }
    if len(sys.argv) != 2 or sys.argv[1] not in kinds:
        sys.exit("usage: peers.py forking|threading|udp")
    server_class, handler = kinds[sys.argv[1]]
    with server_class(("127.0.0.1", 0), handler) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
