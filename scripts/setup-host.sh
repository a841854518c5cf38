#!/usr/bin/env bash
# Prepare this machine for running and testing kvmagent. Idempotent; safe to run again.
#   setup-host.sh packages   install the Debian packages that are missing
#   setup-host.sh services   start virtlogd, libvirtd and dockerd when they are not running
# On a host with systemd as PID 1 the services are started through systemctl.
set -euo pipefail

PACKAGES=(
  libvirt-daemon-system libvirt-dev pkg-config gcc python3-venv
  qemu-system-x86 qemu-utils
  docker.io busybox-static
  qemu-guest-agent  # not for the host: the test guest's initramfs carries its qemu-ga
  nftables iproute2 iptables util-linux procps fuse3 kmod openssl
)

log() { echo "setup-host: $*" >&2; }

packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
  fi
}

running() { pgrep -x "$1" >/dev/null; }

wait_for() {  # wait_for SECONDS CMD...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

services() {
  if [[ -d /run/systemd/system ]]; then
    systemctl start virtlogd libvirtd docker
    return
  fi
  # No systemd: do what it does at boot, then start the daemons by hand. systemd mounts
  # hugetlbfs at /dev/hugepages (dev-hugepages.mount); libvirtd looks for hugetlbfs mounts only
  # when it starts, so without this no hugepage-backed VM could start here.
  if ! awk '$3 == "hugetlbfs" {found=1} END {exit !found}' /proc/mounts; then
    mkdir -p /dev/hugepages
    mount -t hugetlbfs hugetlbfs /dev/hugepages
  fi
  # virtlogd first, or domain starts fail.
  running virtlogd || virtlogd -d
  running libvirtd || libvirtd -d
  wait_for 30 virsh -c qemu:///system version || { log "libvirtd did not come up"; return 1; }
  if ! running dockerd; then
    log "starting dockerd (log: /var/log/dockerd.log)"
    setsid dockerd >/var/log/dockerd.log 2>&1 < /dev/null &
  fi
  wait_for 60 docker version || { log "dockerd did not come up; see /var/log/dockerd.log"; return 1; }
}

case "${1:-all}" in
  packages) packages ;;
  services) services ;;
  all) packages; services ;;
  *) echo "usage: $0 [packages|services|all]" >&2; exit 2 ;;
esac
