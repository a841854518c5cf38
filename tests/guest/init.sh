#!/bin/sh
# /init of the kvmagent test guest (busybox sh, PID 1).  Built into the
# initramfs by tests/guest/build.py; the build cache is keyed by a hash of this
# file, so editing it triggers a rebuild.
#
# Console protocol (one line each, on ttyS0):
#   KVMAGENT-GUEST-READY                      boot finished, loop running
#   KVMAGENT-GUEST-ALIVE <n>                  heartbeat every 5 s
#   VIRTIOFS-MOUNTED <tag>                    tag mounted at /mnt/<tag>
#   VIRTIOFS-READ <tag> <file> <first line>   for up to 5 regular files
#   VIRTIOFS-GONE <tag>                       device removed, lazily unmounted
#   KVMAGENT-GUEST-POWEROFF                   ACPI power button seen
#   KVMAGENT-GUEST-QGA <device>               qemu-ga serving the guest agent channel
#   KVMAGENT-GUEST-WARN <text>                something unexpected
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel may not have found /dev/console before devtmpfs was mounted.
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /run /tmp /mnt
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /mnt

warn() { echo "KVMAGENT-GUEST-WARN $*"; }

# Modules, in dependency order (one name a line, files in /lib/modules/).
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || warn "insmod $m failed"
done </etc/kvmagent/modules

# Tags accepted from the kernel command line: kvmagent.vfstags=a,b
# kvmagent.vfsdiscover=0 turns off tag discovery (to test the fallback);
# kvmagent.debug=1 keeps kernel messages on the console;
# kvmagent.qga=0 leaves the guest agent off (to test a guest without one).
CMDLINE_TAGS=""
DISCOVER=1
DEBUG=0
QGA=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kvmagent.vfstags=*) CMDLINE_TAGS=$(echo "${arg#kvmagent.vfstags=}" | tr ',' ' ') ;;
        kvmagent.vfsdiscover=0) DISCOVER=0 ;;
        kvmagent.debug=1) DEBUG=1 ;;
        kvmagent.qga=0) QGA=0 ;;
    esac
done

# From here on keep kernel chatter (e.g. "virtio-fs: tag <x> not found" from
# probing) off the serial console, unless kvmagent.debug=1.
[ "$DEBUG" = 1 ] || dmesg -n 1

# --- ACPI power button -> poweroff ---------------------------------------
# button.ko turns the ACPI power button into an input device named
# "Power Button"; any event on it is a press.  Read one event and power off.
powerbutton_watch() {
    found=0
    for ev in /sys/class/input/event*; do
        [ -e "$ev" ] || continue
        name=$(cat "$ev/device/name" 2>/dev/null)
        [ "$name" = "Power Button" ] || continue
        node="/dev/input/${ev##*/}"
        [ -c "$node" ] || continue
        found=1
        (
            # Open the device before READY is printed (see below): evdev delivers events only
            # to readers that have it open, so a press sent right after READY would be lost.
            exec 3<"$node" || exit 0
            : >"/run/powerbutton-open.${ev##*/}"
            # one struct input_event (24 bytes on x86_64) = a press
            if dd of=/dev/null bs=24 count=1 <&3 2>/dev/null; then
                echo "KVMAGENT-GUEST-POWEROFF"
                sync
                poweroff -f
            else
                warn "cannot read $node: ACPI shutdown will not work"
            fi
        ) &
    done
    [ "$found" = 1 ]
}
# The input device appears while button.ko probes; allow it a moment.
tries=0
until powerbutton_watch; do
    tries=$((tries + 1))
    if [ $tries -ge 20 ]; then
        warn "no ACPI power button input device; virDomainShutdown will not work"
        break
    fi
    sleep 0.1
done
# Wait (bounded) until the watchers have the device open.
tries=0
while [ "$found" = 1 ] && ! ls /run/powerbutton-open.* >/dev/null 2>&1 && [ $tries -lt 50 ]; do
    tries=$((tries + 1))
    sleep 0.1
done

# --- QEMU guest agent ------------------------------------------------------
# Serve the virtio-serial port named org.qemu.guest_agent.0 (present when the
# domain has the channel, as the agent's domains do).  The port shows up while
# virtio_console probes, so look for it a few times, in the background.
qga_start() {
    for port in /sys/class/virtio-ports/*; do
        [ -r "$port/name" ] && read -r pname <"$port/name" || continue
        [ "$pname" = org.qemu.guest_agent.0 ] || continue
        dev="/dev/${port##*/}"
        [ -c "$dev" ] || continue
        mkdir -p /run/qga
        qemu-ga -m virtio-serial -p "$dev" -t /run/qga -l /run/qga/log -d -f /run/qga/pid ||
            { warn "qemu-ga failed to start on $dev"; return 0; }
        echo "KVMAGENT-GUEST-QGA $dev"
        return 0
    done
    return 1
}
if [ "$QGA" = 1 ]; then
    (
        tries=0
        until qga_start; do
            tries=$((tries + 1))
            [ $tries -lt 50 ] || exit 0   # no channel: a guest without an agent
            sleep 0.2
        done
    ) &
fi

# --- virtiofs tag discovery -------------------------------------------------
valid_tag() {
    case "$1" in
        "" | *[!A-Za-z0-9._-]*) return 1 ;;
    esac
    return 0
}

# Load the first 256 bytes of PCI config file $1 into C0..C255 (hex).
cfgload() {
    i=0
    for x in $(dd if="$1" bs=256 count=1 2>/dev/null | hexdump -v -e '1/1 "%02x "'); do
        eval "C$i=$x"
        i=$((i + 1))
    done
    [ $i -ge 256 ]
}

# R = byte $1 of the loaded config space (no subshell)
cb() {
    eval "R=\$(( 0x\${C$(($1)):-00} ))"
}

# R = 32-bit little-endian value at offset $1
cd32() {
    cb $(($1 + 3)); r3=$R
    cb $(($1 + 2)); r2=$R
    cb $(($1 + 1)); r1=$R
    cb $1
    R=$(( R | (r1 << 8) | (r2 << 16) | (r3 << 24) ))
}

# Write a 32-bit little-endian value $2 at 4-aligned config offset $1 of file $3.
cfgwrite32() {
    printf "\\$(printf %03o $(($2 & 255)))\\$(printf %03o $((($2 >> 8) & 255)))\\$(printf %03o $((($2 >> 16) & 255)))\\$(printf %03o $((($2 >> 24) & 255)))" |
        dd of="$3" bs=4 seek=$(($1 / 4)) count=1 conv=notrunc 2>/dev/null
}

# Linux 6.1 does not expose virtiofs tags in sysfs (/sys/fs/virtiofs/*/tag
# arrived in 6.9).  Read the tag (struct virtio_fs_config.tag[36]) from the
# device config space through the virtio PCI "PCI configuration access"
# capability (VIRTIO_PCI_CAP_PCI_CFG, cfg_type 5): a window in PCI config
# space onto the BARs, reachable through the sysfs `config` file (BAR mmap
# is refused by CONFIG_IO_STRICT_DEVMEM while the driver owns the BAR).
pci_virtiofs_tag() {
    cfgfile="$1/config"
    cfgload "$cfgfile" || return 1
    cb 0x34; p=$R
    devbar="" devoff="" wincap=""
    guard=0
    while [ "$p" -ne 0 ] && [ $guard -lt 48 ]; do
        guard=$((guard + 1))
        cb $p
        if [ "$R" -eq 9 ]; then
            cb $((p + 3))
            if [ "$R" -eq 4 ]; then
                cb $((p + 4)); devbar=$R
                cd32 $((p + 8)); devoff=$R
            elif [ "$R" -eq 5 ]; then
                wincap=$p
            fi
        fi
        cb $((p + 1)); p=$R
    done
    [ -n "$devbar" ] && [ -n "$wincap" ] || return 1
    # struct virtio_pci_cfg_cap: cap.bar at +4 (shares its dword with cap.id
    # and padding), cap.offset at +8, cap.length at +12, pci_cfg_data at +16.
    cd32 $((wincap + 4))
    cfgwrite32 $((wincap + 4)) $(( (R & ~255) | devbar )) "$cfgfile"
    cfgwrite32 $((wincap + 12)) 4 "$cfgfile"
    tag=""
    i=0
    while [ $i -lt 36 ]; do
        cfgwrite32 $((wincap + 8)) $((devoff + i)) "$cfgfile"
        for b in $(dd if="$cfgfile" bs=4 skip=$(((wincap + 16) / 4)) count=1 2>/dev/null | hexdump -v -e '1/1 "%02x "'); do
            [ "$b" = 00 ] && { echo "$tag"; return 0; }
            tag="$tag$(printf "\\$(printf %03o 0x$b)")"
        done
        i=$((i + 4))
    done
    echo "$tag"
}

# Tags of virtio-fs devices (virtio device id 26) present right now.  The
# PCI read is cached per device instance (sysfs inode numbers are not reused
# soon, so a device re-plugged at the same slot gets a fresh entry).
mkdir -p /run/vfstag
discovered_tags() {
    [ "$DISCOVER" = 1 ] || return 0
    if [ -d /sys/fs/virtiofs ]; then
        for f in /sys/fs/virtiofs/*/tag; do
            [ -r "$f" ] && read -r t <"$f" && echo "$t"
        done
        return 0
    fi
    set -- /sys/bus/virtio/devices/virtio*
    [ -e "$1" ] || return 0
    # Builtins only per device, so an idle guest costs little CPU under TCG.
    ls -iLd "$@" 2>/dev/null | while read -r ino v; do
        [ -r "$v/device" ] && read -r id <"$v/device" || continue
        [ "$id" = 0x001a ] || continue
        if [ -f "/run/vfstag/$ino" ] && read -r t <"/run/vfstag/$ino"; then
            echo "$t"
            continue
        fi
        pdev=$(readlink -f "$v/..")
        [ -e "$pdev/config" ] || continue
        t=$(pci_virtiofs_tag "$pdev") || continue
        [ -e "$v/device" ] || continue   # gone while we were reading
        echo "$t" >"/run/vfstag/$ino"
        echo "$t"
    done 2>/dev/null   # devices may vanish under us: no noise on the console
}

# Is $1 still backed by a device?  For tags we cannot discover, try a second
# mount: it fails with ENOENT once the device is gone ("tag not found").
probe_tag() {
    mkdir -p /run/probe
    if timeout 5 mount -t virtiofs "$1" /run/probe 2>/dev/null; then
        umount /run/probe 2>/dev/null || umount -l /run/probe 2>/dev/null
        return 0
    fi
    return 1
}

report_files() {
    n=0
    for f in "/mnt/$1"/*; do
        [ $n -lt 5 ] || break
        [ -f "$f" ] || continue
        line=$(timeout 5 head -c 200 "$f" 2>/dev/null | head -n 1)
        echo "VIRTIOFS-READ $1 ${f##*/} $line"
        n=$((n + 1))
    done
}

echo "KVMAGENT-GUEST-READY"

# --- heartbeat ------------------------------------------------------------
(
    n=0
    while :; do
        echo "KVMAGENT-GUEST-ALIVE $n"
        n=$((n + 1))
        sleep 5
    done
) &


# Space-padded word lists: " a b ".
MOUNTED=" "
FAILED=" "
has() { case "$1" in *" $2 "*) return 0 ;; esac; return 1; }
without() {
    out=" "
    for w in $1; do [ "$w" = "$2" ] || out="$out$w "; done
    echo "$out"
}

while :; do
    DISC=" "
    for t in $(discovered_tags); do
        if valid_tag "$t"; then
            DISC="$DISC$t "
        elif ! has "$FAILED" "?$t"; then
            warn "ignoring virtiofs tag with unsupported characters: '$t'"
            FAILED="$FAILED?$t "
        fi
    done
    for t in $DISC $CMDLINE_TAGS; do
        has "$MOUNTED" "$t" && continue
        valid_tag "$t" || continue
        mkdir -p "/mnt/$t"
        if timeout 10 mount -t virtiofs "$t" "/mnt/$t" 2>/dev/null; then
            MOUNTED="$MOUNTED$t "
            FAILED=$(without "$FAILED" "$t")
            echo "VIRTIOFS-MOUNTED $t"
            report_files "$t"
        elif has "$DISC" "$t" && ! has "$FAILED" "$t"; then
            warn "mount of virtiofs tag $t failed"
            FAILED="$FAILED$t "
        fi
    done
    for t in $MOUNTED; do
        has "$DISC" "$t" && continue
        probe_tag "$t" && continue
        umount -l "/mnt/$t" 2>/dev/null
        rmdir "/mnt/$t" 2>/dev/null
        MOUNTED=$(without "$MOUNTED" "$t")
        FAILED=$(without "$FAILED" "$t")
        echo "VIRTIOFS-GONE $t"
    done
    sleep 0.5
done
