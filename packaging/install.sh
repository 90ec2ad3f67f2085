#!/bin/sh
# Install echo-forkd from a built tree on any Unix:
#   cargo build --release
#   [DESTDIR=/tmp/stage] [PREFIX=/usr/local] packaging/install.sh
#
# PREFIX     where sbin/ and share/man/ go (default /usr/local)
# SYSCONFDIR where echo-forkd/echo-forkd.conf goes (default /etc when
#            PREFIX is /usr, else PREFIX/etc)
# MANDIR     default PREFIX/share/man
# UNITDIR    systemd units (default PREFIX/lib/systemd/system, Linux only;
#            set it empty to skip them)
# STATEDIR   where the empty chroot directory goes (default /var/lib/echo-forkd
#            when PREFIX is /usr, else PREFIX/var/lib/echo-forkd)
# DESTDIR    staging root, for packagers
#
# An existing config file is kept; the new one is installed beside it as
# echo-forkd.conf.new. Creating the echo-forkd user is left to you (see the
# README): useradd -r -s /usr/sbin/nologin -d /nonexistent echo-forkd
set -eu
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
if [ "$PREFIX" = /usr ]; then
    SYSCONFDIR=${SYSCONFDIR:-/etc}
else
    SYSCONFDIR=${SYSCONFDIR:-$PREFIX/etc}
fi
MANDIR=${MANDIR:-$PREFIX/share/man}
if [ "$PREFIX" = /usr ]; then
    STATEDIR=${STATEDIR:-/var/lib/echo-forkd}
else
    STATEDIR=${STATEDIR:-$PREFIX/var/lib/echo-forkd}
fi
if [ "$(uname -s)" = Linux ]; then
    UNITDIR=${UNITDIR-$PREFIX/lib/systemd/system}
else
    UNITDIR=${UNITDIR-}
fi
DESTDIR=${DESTDIR:-}

bin=target/release/echo-forkd
[ -x "$bin" ] || { echo "install.sh: $bin missing: run cargo build --release first" >&2; exit 1; }

# Files that name paths get the ones chosen here.
edit() {
    sed -e "s|/usr/sbin/echo-forkd|$PREFIX/sbin/echo-forkd|g" \
        -e "s|/etc/echo-forkd/|$SYSCONFDIR/echo-forkd/|g" \
        -e "s|/usr/lib/systemd/system|${UNITDIR:-/usr/lib/systemd/system}|g" \
        -e "s|/var/lib/echo-forkd|$STATEDIR|g" "$1"
}

install -d "$DESTDIR$PREFIX/sbin" "$DESTDIR$MANDIR/man8" "$DESTDIR$SYSCONFDIR/echo-forkd"
install -m 0755 "$bin" "$DESTDIR$PREFIX/sbin/echo-forkd"
# As the package does: no symbols or notes, a smaller file.
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    "$DESTDIR$PREFIX/sbin/echo-forkd" 2>/dev/null || strip "$DESTDIR$PREFIX/sbin/echo-forkd" || true
install -d -m 0755 "$DESTDIR$STATEDIR/empty"
edit man/echo-forkd.8 | gzip -9n >"$DESTDIR$MANDIR/man8/echo-forkd.8.gz"
chmod 0644 "$DESTDIR$MANDIR/man8/echo-forkd.8.gz"
echo "$PREFIX/sbin/echo-forkd"
echo "$MANDIR/man8/echo-forkd.8.gz"
echo "$STATEDIR/empty/"

conf="$DESTDIR$SYSCONFDIR/echo-forkd/echo-forkd.conf"
if [ -e "$conf" ]; then
    edit packaging/echo-forkd.conf >"$conf.new"
    chmod 0644 "$conf.new"
    echo "$SYSCONFDIR/echo-forkd/echo-forkd.conf.new (kept the existing echo-forkd.conf)"
else
    edit packaging/echo-forkd.conf >"$conf"
    chmod 0644 "$conf"
    echo "$SYSCONFDIR/echo-forkd/echo-forkd.conf"
fi

if [ -n "$UNITDIR" ]; then
    install -d "$DESTDIR$UNITDIR"
    for unit in echo-forkd.service echo-forkd.socket; do
        edit "packaging/$unit" >"$DESTDIR$UNITDIR/$unit"
        chmod 0644 "$DESTDIR$UNITDIR/$unit"
        echo "$UNITDIR/$unit"
    done
fi
