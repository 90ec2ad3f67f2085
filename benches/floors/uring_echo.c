/*
 * The io_uring floor of the load benchmark (`uring` in its tables): the
 * least an io_uring echo server does, as serve-epoll is the least an epoll
 * one does. One thread, one ring set up for a single issuer with deferred
 * task work (cooperative task work on kernels before 6.1), a multishot
 * accept on the listener, a multishot receive per connection into a ring
 * of provided buffers shared by all connections, and a send of what each
 * receive brought. One send at a time per connection, of everything
 * queued (up to 64 buffers, one sendmsg): two sends in flight on one
 * socket may complete out of order. A buffer goes back to the ring once
 * its bytes were sent.
 *
 * Built by the benchmark with `cc -O2 … -luring` where liburing's headers
 * are (Debian: liburing-dev); it listens on 127.0.0.1, port 0, and prints
 * the port it got.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define ENTRIES 4096
#define NBUFS 4096		/* a power of two */
#define BUFSZ 4096
#define BGID 0
#define MAXFD 65536
#define IOVS 64

enum { ACCEPT = 1, RECV = 2, SEND = 3 };

struct conn {
	int recv_armed;		/* a multishot receive is in flight */
	int sending;		/* a send is in flight */
	int closing;		/* end of file or an error: close once idle */
	int head, tail;		/* buffers received, not yet sent (-1: none) */
	int off;		/* bytes of the head buffer sent */
	struct iovec *iov;	/* the send in flight's (IOVS, allocated once) */
	struct msghdr msg;
};

static struct io_uring ring;
static struct io_uring_buf_ring *br;
static unsigned char *bufs;
static int next_buf[NBUFS];
static int buf_len[NBUFS];
static struct conn conns[MAXFD];

static uint64_t tag(int kind, int fd) { return (uint64_t)kind << 32 | (uint32_t)fd; }

static struct io_uring_sqe *sqe(void)
{
	struct io_uring_sqe *s = io_uring_get_sqe(&ring);
	if (!s) {
		io_uring_submit(&ring);
		s = io_uring_get_sqe(&ring);
	}
	if (!s) {
		fprintf(stderr, "uring_echo: submission queue full\n");
		exit(1);
	}
	return s;
}

static void give_back(int bid)
{
	io_uring_buf_ring_add(br, bufs + (size_t)bid * BUFSZ, BUFSZ, bid,
			      io_uring_buf_ring_mask(NBUFS), 0);
	io_uring_buf_ring_advance(br, 1);
}

static void arm_accept(int lfd)
{
	struct io_uring_sqe *s = sqe();
	io_uring_prep_multishot_accept(s, lfd, NULL, NULL, SOCK_CLOEXEC);
	io_uring_sqe_set_data64(s, tag(ACCEPT, lfd));
}

static void arm_recv(int fd)
{
	struct io_uring_sqe *s = sqe();
	io_uring_prep_recv_multishot(s, fd, NULL, 0, 0);
	s->flags |= IOSQE_BUFFER_SELECT;
	s->buf_group = BGID;
	io_uring_sqe_set_data64(s, tag(RECV, fd));
	conns[fd].recv_armed = 1;
}

static void send_head(int fd)
{
	struct conn *c = &conns[fd];
	if (!c->iov && !(c->iov = malloc(IOVS * sizeof(struct iovec)))) {
		fprintf(stderr, "uring_echo: out of memory\n");
		exit(1);
	}
	int n = 0, off = c->off;
	for (int bid = c->head; bid >= 0 && n < IOVS; bid = next_buf[bid], off = 0) {
		c->iov[n].iov_base = bufs + (size_t)bid * BUFSZ + off;
		c->iov[n].iov_len = buf_len[bid] - off;
		n++;
	}
	memset(&c->msg, 0, sizeof(c->msg));
	c->msg.msg_iov = c->iov;
	c->msg.msg_iovlen = n;
	struct io_uring_sqe *s = sqe();
	io_uring_prep_sendmsg(s, fd, &c->msg, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(s, tag(SEND, fd));
	c->sending = 1;
}

static void maybe_close(int fd)
{
	struct conn *c = &conns[fd];
	if (!c->closing || c->recv_armed || c->sending)
		return;
	while (c->head >= 0) {
		int bid = c->head;
		c->head = next_buf[bid];
		give_back(bid);
	}
	close(fd);
	struct iovec *iov = c->iov;
	memset(c, 0, sizeof(*c));
	c->iov = iov;
	c->head = c->tail = -1;
}

/* Ends the connection: its receive is stopped by the shutdown. */
static void fail(int fd)
{
	conns[fd].closing = 1;
	shutdown(fd, SHUT_RDWR);
	maybe_close(fd);
}

static void on_recv(int fd, struct io_uring_cqe *cqe)
{
	struct conn *c = &conns[fd];
	if (!(cqe->flags & IORING_CQE_F_MORE))
		c->recv_armed = 0;
	if (cqe->res > 0) {
		int bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
		buf_len[bid] = cqe->res;
		next_buf[bid] = -1;
		if (c->tail >= 0)
			next_buf[c->tail] = bid;
		else
			c->head = bid;
		c->tail = bid;
		if (!c->sending && !c->closing) {
			c->off = 0;
			send_head(fd);
		}
		if (!c->recv_armed && !c->closing)
			arm_recv(fd);
		maybe_close(fd);
	} else if (cqe->res == -ENOBUFS) {
		/* The ring ran dry: buffers come back as sends complete. */
		if (!c->recv_armed && !c->closing)
			arm_recv(fd);
	} else {
		/* End of file or an error: send what is queued, then close. */
		c->closing = 1;
		if (!c->sending && c->head >= 0 && cqe->res == 0) {
			c->off = 0;
			send_head(fd);
		}
		maybe_close(fd);
	}
}

static void on_send(int fd, int res)
{
	struct conn *c = &conns[fd];
	c->sending = 0;
	if (res < 0) {
		fail(fd);
		return;
	}
	/* What was sent goes back to the ring, the rest stays queued. */
	while (res > 0) {
		int bid = c->head, left = buf_len[bid] - c->off;
		if (res < left) {
			c->off += res;
			break;
		}
		res -= left;
		c->off = 0;
		c->head = next_buf[bid];
		if (c->head < 0)
			c->tail = -1;
		give_back(bid);
	}
	if (c->head >= 0)
		send_head(fd);
	else
		maybe_close(fd);
}

int main(void)
{
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof(a);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 4096) ||
	    getsockname(lfd, (struct sockaddr *)&a, &alen)) {
		perror("uring_echo: listener");
		return 1;
	}

	struct io_uring_params p = { .flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN };
	int rc = io_uring_queue_init_params(ENTRIES, &ring, &p);
	if (rc == -EINVAL) {
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_COOP_TASKRUN;
		rc = io_uring_queue_init_params(ENTRIES, &ring, &p);
	}
	if (rc < 0) {
		fprintf(stderr, "uring_echo: io_uring_queue_init: %s\n", strerror(-rc));
		return 1;
	}

	size_t ring_size = NBUFS * sizeof(struct io_uring_buf);
	br = mmap(NULL, ring_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	bufs = mmap(NULL, (size_t)NBUFS * BUFSZ, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (br == MAP_FAILED || bufs == MAP_FAILED) {
		perror("uring_echo: mmap");
		return 1;
	}
	struct io_uring_buf_reg reg = { .ring_addr = (uintptr_t)br, .ring_entries = NBUFS, .bgid = BGID };
	rc = io_uring_register_buf_ring(&ring, &reg, 0);
	if (rc < 0) {
		fprintf(stderr, "uring_echo: io_uring_register_buf_ring: %s\n", strerror(-rc));
		return 1;
	}
	io_uring_buf_ring_init(br);
	for (int i = 0; i < NBUFS; i++)
		io_uring_buf_ring_add(br, bufs + (size_t)i * BUFSZ, BUFSZ, i,
				      io_uring_buf_ring_mask(NBUFS), i);
	io_uring_buf_ring_advance(br, NBUFS);
	for (int i = 0; i < MAXFD; i++)
		conns[i].head = conns[i].tail = -1;

	printf("%d\n", ntohs(a.sin_port));
	fflush(stdout);

	arm_accept(lfd);
	for (;;) {
		rc = io_uring_submit_and_wait(&ring, 1);
		if (rc < 0 && rc != -EINTR) {
			fprintf(stderr, "uring_echo: io_uring_submit_and_wait: %s\n", strerror(-rc));
			return 1;
		}
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&ring, head, cqe) {
			uint64_t d = io_uring_cqe_get_data64(cqe);
			int kind = d >> 32, fd = (int)(uint32_t)d;
			seen++;
			switch (kind) {
			case ACCEPT:
				if (cqe->res >= 0) {
					if (cqe->res >= MAXFD) {
						close(cqe->res);
					} else {
						arm_recv(cqe->res);
					}
				}
				if (!(cqe->flags & IORING_CQE_F_MORE))
					arm_accept(lfd);
				break;
			case RECV:
				on_recv(fd, cqe);
				break;
			case SEND:
				on_send(fd, cqe->res);
				break;
			}
		}
		io_uring_cq_advance(&ring, seen);
	}
}
